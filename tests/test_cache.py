"""The cache: keys that name the versions and device kind, `w2d cache ls` and `w2d cache prune`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import weights2data
import weights2data.features as features
from weights2data.block_gradients import block_features
from weights2data.cache import KINDS, entries, prune
from weights2data.cli import main
from weights2data.config import DataConfig, DefenseConfig, EvalConfig, FinetuneConfig
from weights2data.data import encode_classification, encode_lm, load_dataset
from weights2data.defend import defend_cached
from weights2data.features import cache_key, hidden_states
from weights2data.lm_features import lm_features
from weights2data.models import load_model
from weights2data.pipeline import Workspace, finetune_cached
from weights2data.train import lm_loss_sum, resolve_task, train_eval

TEXTS = [f"the {animal} sat on the mat" for animal in "cat dog cow hen fox owl bee ant".split()]
DAY = 86400


def test_cache_key_names_the_versions_and_the_device_kind() -> None:
    key = cache_key(torch.device("cuda:1"), weights="abc")
    assert key == {
        "weights2data": weights2data.__version__,
        "torch": torch.__version__,
        "device": "cuda",
        "weights": "abc",
    }
    assert cache_key("cpu")["device"] == "cpu"


def test_rows_are_shared_only_within_one_version_and_device_kind(tiny, tmp_path, monkeypatch) -> None:
    encoded = encode_classification(tiny.tokenizer, TEXTS, 16)
    hidden_states(tiny, encoded.subset(slice(0, 6)), last_only=True, cache_root=tmp_path)
    run, real_forward = [], features.forward_hidden

    def counted(model, batch, layer):
        run.append(len(batch))
        return real_forward(model, batch, layer)

    monkeypatch.setattr(features, "forward_hidden", counted)

    def rows_computed(stop: int) -> int:
        run.clear()
        hidden_states(tiny, encoded.subset(slice(0, stop)), last_only=True, cache_root=tmp_path)
        return sum(run)

    assert rows_computed(7) == 1  # rows 0-5 shared
    monkeypatch.setattr(features, "__version__", "99.0")
    assert rows_computed(8) == 8  # another weights2data: nothing shared
    monkeypatch.setattr(features, "__version__", weights2data.__version__)
    for meta in tmp_path.glob("hidden/*/meta.json"):  # as if every entry had been computed on a GPU
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "device": "cuda"}))
    assert rows_computed(5) == 5


def populate(cache: Path, data_dir: Path) -> None:
    """One entry of each kind, from the tiny model."""
    ws = Workspace(cache, data_dir, torch.device("cpu"))
    ds = load_dataset("ag_news_16", data_dir=data_dir)
    data, ft = DataConfig(seq_len=8), FinetuneConfig(train_scope="head", lr=1e-2, epochs=1)
    path, _ = finetune_cached(ws, "tiny-test", ds, data, ft)
    defend_cached(cache, ws.model(str(path)), DefenseConfig(method="noise"))
    reuse_scores(cache, data_dir)
    base, other = ws.model("tiny-test"), ws.model("tiny-test:1")
    encoded = encode_lm(base.tokenizer, TEXTS, 12)
    lm_features(base, other, encoded, dim=16, cache_root=cache, progress=False)
    head = other.model.get_output_embeddings()

    def loss(final, batch, _index):
        return lm_loss_sum(head(final), batch, "full")[0]

    options = {"blocks": 1, "dim": 4, "cache_root": cache, "loss_key": "lm", "progress": False}
    block_features(base, other, encoded, loss, **options)
    # laid out as generate.py, rounds.py and synthesis.py write them (their own tests make real ones)
    (cache / "generated").mkdir()
    (cache / "generated" / "0123abcd.json").write_text("{}")
    (cache / "rounds" / "0123abcd").mkdir(parents=True)
    (cache / "rounds" / "0123abcd" / "round_000.json").write_text("{}")
    (cache / "synthesis").mkdir()
    (cache / "synthesis" / "0123abcd.safetensors").write_bytes(b"")


def reuse_scores(cache: Path, data_dir: Path) -> dict:
    """A train-eval run: computed the first time, read back after."""
    model = load_model("tiny-test", cache=cache)
    ds = load_dataset("ag_news_16", data_dir=data_dir)
    task = resolve_task(DataConfig(seq_len=8), ds, model)
    ft, ev = FinetuneConfig(train_scope="head", lr=1e-2), EvalConfig(max_eval_rows=8, eval_epochs=1)
    return train_eval(model, ds.train, ds.test, task, ft, ev, cache_root=cache)


def age(path: Path, days: float) -> None:
    """Set the modification time of `path` and everything under it `days` days back."""
    then = time.time() - days * DAY
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_ls_and_prune(cli_env, fresh_cache, data_dir, cache, capsys) -> None:
    populate(fresh_cache, data_dir)
    listed = entries(fresh_cache)
    assert {e.kind for e in listed} == set(KINDS)
    stale = fresh_cache / "finetuned" / ".af3c165d6c749055.0123456789ab.tmp"  # a killed model save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    age(stale, 1)
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert f"\n{kind} " in out
    assert f"weights2data {weights2data.__version__}, torch {torch.__version__}, cpu" in out
    assert "1/1 chunks" in out and "tiny-test on ag_news_16 (classification, head)" in out
    assert "noise 0.01 of " in out and "1 finished rounds" in out and "a synthesiser's saved state" in out
    assert "1 temporary files left by killed runs" in out

    scores = next(e.path for e in listed if e.kind == "train-eval")
    for entry in listed:
        age(entry.path, 40)
    young = scores.with_name(f".{scores.name}.ba9876543210.tmp")  # may be a live write
    young.write_text("{")
    reuse_scores(fresh_cache, data_dir)  # reading an entry back is a use
    assert main(["cache", "prune", "--older-than", "30", "--dry-run"]) == 0
    assert "would delete" in capsys.readouterr().out
    assert len(entries(fresh_cache)) == len(listed) and stale.exists()
    assert main(["cache", "prune", "--older-than", "30"]) == 0
    left = entries(fresh_cache)
    assert {e.path for e in left} == {scores} | {e.path for e in listed if e.kind == "models"}
    assert not stale.exists() and young.exists()

    assert main(["cache", "prune", "--all"]) == 0
    assert {e.kind for e in entries(fresh_cache)} == {"models"}  # never pruned unless named
    doomed, _ = prune(fresh_cache, ["models"], None, every=True, dry_run=False)
    assert {e.path.name for e in doomed} >= {"smollm2-tokenizer"} and entries(fresh_cache) == []
    assert (cache / "models" / "smollm2-tokenizer" / "tokenizer.json").exists()  # a link's target stays


@pytest.mark.parametrize("argv", [["cache"], ["cache", "ls"], ["cache", "prune"]])
def test_cache_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "device kind" in out and "lm-features" in out and "train-eval" in out
    if argv[-1] == "prune":
        for flag in ("--older-than", "--all", "--kind", "--dry-run", "--cache-dir"):
            assert flag in out
        assert "smollm2-135m" in out
