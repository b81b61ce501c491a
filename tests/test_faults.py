"""Fault drills: a process killed with SIGKILL mid-run, a full disk, a read-only cache.

A killed run is a child process that pauses at a chosen point (halfway through writing a cache
chunk, or at the start of a training epoch) and is killed there with SIGKILL; the rerun must
compute only what was missing and give exactly what an uninterrupted run gives. A failed write
must be a one-line error with a non-zero exit, and leave no half-written file behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weights2data.features as features
from weights2data.block_gradients import block_features
from weights2data.cli import main
from weights2data.data import data_dir, encode_classification, encode_lm, load_dataset
from weights2data.features import hidden_states
from weights2data.lm_features import lm_features
from weights2data.models import load_model
from weights2data.store import is_temp
from weights2data.train import lm_loss_sum

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
WAIT_S = 600  # a loaded 2-core machine imports torch and transformers slowly

# Runs in the child: counts chunk saves per kind, pauses where the drill says (a marker file tells
# the parent it is there), then runs the drill's body.
CHILD = """
import importlib, json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import weights2data.features as features

out = Path({out!r})
saves = []

def pause():
    (out / "paused").write_text("")
    time.sleep(3600)

def save(self, rows, tensors, real=features.ChunkCache.save):
    kind = self.folder.parent.name
    if [kind, saves.count(kind)] == {pause_in_save!r}:  # killed halfway through writing this chunk
        with features.atomic_path(self.path(rows)) as tmp:
            tmp.write_bytes(b"half a chunk")
            pause()
    saves.append(kind)
    real(self, rows, tensors)

features.ChunkCache.save = save
if {pause_in_call!r}:
    module_name, name, number = {pause_in_call!r}
    module, calls = importlib.import_module(module_name), []
    def paused(*args, real=getattr(module, name), **kwargs):
        calls.append(1)
        if len(calls) == number:
            pause()
        return real(*args, **kwargs)
    setattr(module, name, paused)
if {chunk_rows!r}:
    features.CHUNK_ROWS = {chunk_rows!r}
try:
{body}
finally:
    (out / "saves.json").write_text(json.dumps(saves))
"""


def child(out: Path, body: str, pause_in_save=None, pause_in_call=None, chunk_rows=None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    code = CHILD.format(
        tests=str(TESTS),
        out=str(out),
        pause_in_save=pause_in_save,
        pause_in_call=pause_in_call,
        chunk_rows=chunk_rows,
        body="\n".join("    " + line for line in body.strip().splitlines()),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(out / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=stderr, stderr=stderr)


def kill_when_paused(out: Path, body: str, **pause) -> None:
    """Start the child, wait until it pauses, and kill it with SIGKILL there."""
    proc = child(out, body, **pause)
    deadline = time.time() + WAIT_S
    while not (out / "paused").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never paused:\n{(out / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def rerun(out: Path, body: str, **options) -> list[str]:
    """Run the child to the end; returns the kinds of the chunks it wrote."""
    proc = child(out, body, **options)
    assert proc.wait(timeout=WAIT_S) == 0, (out / "stderr.txt").read_text()[-3000:]
    return json.loads((out / "saves.json").read_text())


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp(p)]


# ---------------------------------------------------------------- featurisation


def featurise(kind: str, models: Path, cache_root: Path) -> dict[str, torch.Tensor]:
    """What a featurisation drill kills and resumes: 40 documents, tiny-test vs tiny-test:1."""
    base = load_model("tiny-test", cache=models)
    texts = load_dataset("wiki_passages_40", data_dir=data_dir()).train.texts
    if kind == "hidden":
        encoded = encode_classification(base.tokenizer, texts, 16)
        return {"hidden": hidden_states(base, encoded, cache_root=cache_root)}
    finetuned = load_model("tiny-test:1", cache=models)
    encoded = encode_lm(base.tokenizer, texts, 16)
    if kind == "lm-features":
        out = lm_features(base, finetuned, encoded, dim=64, cache_root=cache_root, progress=False)
        grads = out.features
        return {"grads": grads.grads, "target_dots": grads.target_dots, "losses": out.losses}
    head = finetuned.model.get_output_embeddings()

    def loss(final: torch.Tensor, batch, _index: slice) -> torch.Tensor:
        return lm_loss_sum(head(final), batch, "full")[0]

    out = block_features(
        base, finetuned, encoded, loss, blocks=1, dim=16, cache_root=cache_root, loss_key="lm", progress=False
    )
    return {"grads": out.features.grads, "target_dots": out.features.target_dots}


FEATURISE = """
from safetensors.torch import save_file
from test_faults import featurise
from weights2data.store import cache_dir
save_file(featurise({kind!r}, cache_dir(), cache_dir()), str(out / "result.safetensors"))
"""


@pytest.mark.parametrize("kind", ["hidden", "lm-features", "blocks"])
def test_kill_during_featurisation_resumes(kind, cli_env, fresh_cache, cache, monkeypatch) -> None:
    body = FEATURISE.format(kind=kind)
    kill_when_paused(cli_env / "killed", body, pause_in_save=[kind, 2], chunk_rows=8)
    chunks = sorted(p.name for p in fresh_cache.glob(f"{kind}/*/chunk_*"))
    assert chunks == ["chunk_000000000.safetensors", "chunk_000000008.safetensors"]
    [half_written] = temp_files(fresh_cache / kind)  # what the kill left: ignored by every reader
    saves = rerun(cli_env / "rerun", body, chunk_rows=8)
    assert saves.count(kind) == 3  # 40 rows in chunks of 8: only the three missing ones
    monkeypatch.setattr(features, "CHUNK_ROWS", 8)
    reference = featurise(kind, cache, cli_env / "uninterrupted")
    resumed = load_file(str(cli_env / "rerun" / "result.safetensors"))
    for name, value in reference.items():
        assert torch.equal(resumed[name].nan_to_num(), value.nan_to_num()), name
    old = time.time() - 3600  # a temporary file an hour old belongs to no live writer
    os.utime(half_written, (old, old))
    assert main(["cache", "prune"]) == 0
    assert temp_files(fresh_cache) == []


# ---------------------------------------------------------------- training loops


TRAIN_EVAL = [
    "train-eval", "--model", "tiny-test", "--train", "ag_news_48", "--dataset", "ag_news", "--seq-len", "16",
    "--train-scope", "top:1", "--lr", "1e-3", "--max-eval-rows", "32", "--eval-epochs", "3",
    "--results-dir", "runs", "--exp-name", "te",
]  # fmt: skip
RUN = [
    "run", "--model", "tiny-test", "--dataset", "ag_news_32", "--select_seed_dataset", "wiki_passages_60",
    "-k", "8", "--strategies", "topk", "--eval-epochs", "2", "--max-eval-rows", "16", "--seq-len", "16",
    "--train-scope", "head", "--lr", "1e-2", "--skip-similarity", "--results_dir", "runs",
    "--exp_name", "loop",
]  # fmt: skip
CLI = "from weights2data.cli import main\nassert main({argv!r}) == 0"


def uninterrupted(argv: list[str], workdir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same command run in one go, in its own cache and directory; returns its run directory."""
    cache.mkdir()
    (cache / "models").symlink_to(Path(os.environ["W2D_CACHE_DIR"]) / "models", target_is_directory=True)
    workdir.mkdir()
    monkeypatch.setenv("W2D_CACHE_DIR", str(cache))
    monkeypatch.chdir(workdir)
    assert main(argv) == 0
    return workdir / "runs"


def test_kill_during_train_eval_resumes(cli_env, monkeypatch) -> None:
    body = CLI.format(argv=TRAIN_EVAL)
    kill_when_paused(cli_env / "killed", body, pause_in_call=["weights2data.train", "train_epoch", 2])
    assert not (cli_env / "runs" / "te" / "metrics.json").exists()
    saves = rerun(cli_env / "rerun", body)
    assert saves == []  # the frozen blocks' outputs were cached before the kill
    resumed = json.loads((cli_env / "runs" / "te" / "metrics.json").read_text())
    runs = uninterrupted(TRAIN_EVAL, cli_env / "ref", cli_env / "ref-cache", monkeypatch)
    assert resumed == json.loads((runs / "te" / "metrics.json").read_text())


def test_kill_during_run_loop_resumes(cli_env, monkeypatch) -> None:
    """`w2d run` trains and scores one model per training set: killed after the first, it resumes."""
    body = CLI.format(argv=RUN)
    kill_when_paused(cli_env / "killed", body, pause_in_call=["weights2data.experiment", "train_eval", 2])
    rerun(cli_env / "rerun", body)
    log = (cli_env / "rerun" / "stderr.txt").read_text()
    assert "reusing the finetuned model" in log and log.count("reusing the scores") == 1  # the expert's
    resumed = json.loads((cli_env / "runs" / "loop" / "results.json").read_text())
    runs = uninterrupted(RUN, cli_env / "ref", cli_env / "ref-cache", monkeypatch)
    reference = json.loads((runs / "loop" / "results.json").read_text())
    assert resumed["scores"] == reference["scores"] and resumed["table"] == reference["table"]


# ---------------------------------------------------------------- failed writes


HEAD_TRAIN_EVAL = [*TRAIN_EVAL[:10], "head", *TRAIN_EVAL[11:]]


@pytest.mark.parametrize("write", ["write_bytes", "write_text"])
def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(
    write, cli_env, fresh_cache, monkeypatch, capsys
) -> None:
    """The disk fills while a cache chunk (write_bytes) or a key file (write_text) is written."""
    real = getattr(Path, write)

    def half_then_full(self: Path, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, write, half_then_full)
    assert main(HEAD_TRAIN_EVAL) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("w2d: error: could not write ")
    assert "the disk is full: free space (see `w2d cache prune --help`)" in err
    assert temp_files(fresh_cache) == [] and list(fresh_cache.glob("*/*/chunk_*")) == []
    assert not (cli_env / "runs" / "te").exists()  # the unfinished run directory is removed too
    monkeypatch.setattr(Path, write, real)
    assert main(HEAD_TRAIN_EVAL) == 0  # space freed: the same command runs


def test_read_only_cache_is_a_clear_error(cli_env, fresh_cache, capsys) -> None:
    fresh_cache.chmod(0o555)
    try:
        if os.access(fresh_cache, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        assert main(HEAD_TRAIN_EVAL) == 2
        err = capsys.readouterr().err
        assert "no permission to write" in err and "--cache-dir" in err and "Traceback" not in err
        assert temp_files(fresh_cache) == []
    finally:
        fresh_cache.chmod(0o755)
