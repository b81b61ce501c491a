"""Sharding across ranks: gloo on CPU, two processes started by the test, picks equal one process's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import weights2data.features as feature_cache
from weights2data.cli import main
from weights2data.distributed import SHARD_ALIGN, Layout, Shard, shard_rows, sharded_select
from weights2data.errors import W2DError
from weights2data.selection import (
    DenseFeatures,
    FactoredFeatures,
    LowRankFeatures,
    SummedFeatures,
    cosines,
    select,
    unit_weights,
)
from weights2data.store import read_json

SRC = Path(__file__).resolve().parents[1] / "src"
WAIT_S = 600  # a loaded 2-core machine imports torch and transformers slowly
STRATEGIES = ("greedy", "greedy_balanced", "greedy_batched", "topk", "topk_balanced", "bottomk", "random")
STRATEGIES += ("loss_drop", "loss_drop_balanced")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_rows_deal_aligned_blocks_in_rank_order() -> None:
    for n, world in [(200, 2), (1000, 3), (64, 2), (1_000_003, 8)]:
        shards = [shard_rows(n, Layout(r, world)) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(s.start % SHARD_ALIGN == 0 and len(s) for s in shards)
        assert max(map(len, shards)) - min(map(len, shards)) <= SHARD_ALIGN
    with pytest.raises(W2DError, match="too small to split over 4 ranks"):
        shard_rows(90, Layout(0, 4))


def test_layout_from_env() -> None:
    assert Layout.from_env({}) == Layout(0, 1, 0) and not Layout.from_env({}).sharded
    layout = Layout.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert layout == Layout(3, 4, 1) and layout.sharded
    assert layout.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert layout.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(W2DError, match="RANK must lie"):
        Layout.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def problems(n: int = 200) -> dict:
    """Feature objects of every kind; the best row by cosine (the first greedy and topk pick) is
    copied onto the other rank, so the first step is an exact tie between ranks."""
    gen = torch.Generator().manual_seed(0)
    errors, hidden = torch.randn(n, 4, generator=gen), torch.randn(n, 24, generator=gen) + 0.5
    delta = torch.randn(4, 24, generator=gen)
    top = int(cosines(FactoredFeatures(errors, hidden, delta)).argmax())
    errors[n - 1 - top], hidden[n - 1 - top] = errors[top], hidden[top]
    grads = torch.randn(n, 32, generator=gen) + torch.linspace(0, 1, 32)
    top = int(cosines(DenseFeatures(grads, torch.linspace(0, 1, 32))).argmax())
    grads[n - 1 - top] = grads[top]
    factored = FactoredFeatures(errors, hidden, delta)
    low_rank = LowRankFeatures(torch.stack([errors, -errors], 1), torch.stack([hidden, hidden**2], 1), delta)
    dense = DenseFeatures(grads, torch.linspace(0, 1, 32), sq_norms=grads.square().sum(1) + 1.0)
    return {"factored": factored, "low-rank": low_rank, "summed": SummedFeatures([factored, dense])}


# rows left out (e.g. --keep-confident's) and a pool of the 2·k best-aligned of the rest (--pool 2)
NARROWED = {"exclude": torch.arange(0, 200, 7), "pool": 2.0}


def rows_of(features, rows: range):
    return features.with_rows(features.row_factors(torch.arange(rows.start, rows.stop)))


def engine_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    n, labels = 200, torch.arange(200) % 3
    losses, base_losses = torch.rand(2, 200, generator=torch.Generator().manual_seed(1))
    shard = Shard.of(n, Layout(rank, 2), torch.device("cpu"))
    results = {}
    for name, features in problems(n).items():
        local = rows_of(features, shard.rows)
        for strategy in STRATEGIES:
            given = {"labels": labels, "losses": losses, "base_losses": base_losses}
            sel = sharded_select(shard, strategy, local, 24, batch_size=5, progress=False, **given)
            results[name, strategy] = (sel.indices, sel.scores, sel.objective)
            sel = sharded_select(
                shard, strategy, local, 24, batch_size=5, progress=False, **given, **NARROWED
            )
            results[name, strategy, "narrowed"] = (sel.indices, sel.scores, sel.objective)
        unit = sharded_select(
            shard, "greedy", local, 24, weights=unit_weights(local), batch_size=5, progress=False
        )
        results[name, "greedy unit"] = (unit.indices, unit.scores, unit.objective)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_strategies_pick_what_one_process_picks(tmp_path: Path) -> None:
    mp.spawn(engine_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    labels = torch.arange(200) % 3
    losses, base_losses = torch.rand(2, 200, generator=torch.Generator().manual_seed(1))
    for name, features in problems().items():
        for strategy in STRATEGIES:
            one = select(
                strategy, features, 24, labels=labels, losses=losses, base_losses=base_losses, batch_size=5,
                progress=False,
            )  # fmt: skip
            narrowed = select(
                strategy, features, 24, labels=labels, losses=losses, base_losses=base_losses, batch_size=5,
                progress=False, **NARROWED,
            )  # fmt: skip
            assert set(narrowed.indices.tolist()).isdisjoint(NARROWED["exclude"].tolist())
            for result in ranks:
                indices, scores, value = result[name, strategy]
                assert indices.tolist() == one.indices.tolist(), (name, strategy)
                assert torch.equal(scores, one.scores) or strategy == "random", (name, strategy)
                assert value == pytest.approx(one.objective, abs=1e-5)
                # one process greedy-picks among the remaining rows' own features, the ranks block
                # the others in place: the same picks, the scores to float rounding
                indices, scores, value = result[name, strategy, "narrowed"]
                assert indices.tolist() == narrowed.indices.tolist(), (name, strategy, "narrowed")
                if strategy != "random":
                    torch.testing.assert_close(scores, narrowed.scores)
                assert value == pytest.approx(narrowed.objective, abs=1e-5)
        one = select("greedy", features, 24, weights=unit_weights(features), progress=False)
        for result in ranks:
            indices, scores, value = result[name, "greedy unit"]
            assert indices.tolist() == one.indices.tolist(), name
            torch.testing.assert_close(scores, one.scores)
            assert value == pytest.approx(one.objective, abs=1e-5)
    factored = problems()["factored"]
    cos = cosines(factored)
    tied = (cos == cos.max()).nonzero().squeeze(1).tolist()
    assert len(tied) == 2 and tied[0] < 96 <= tied[1]  # one on each rank
    assert ranks[0]["factored", "greedy"][0][0] == tied[0]  # the tie goes to the lower row


# ---------------------------------------------------------------- w2d select under torchrun

# the defaults (--strategy auto and its preconditioner, fitted on the whole corpus across ranks) and
# rows left out on their ranks (--keep-confident)
SELECT = (
    "select --base tiny-test --finetuned tiny-test:1 --label-set A,B,C,D --seq-len 16 --device cpu -k 12 "
    "--keep-confident 0.5"
)
CORPUS = "wiki_passages_2500"  # 1248 + 1252 rows: two cache chunks on each rank

# A rank started by hand as torchrun would start it; rank 1 pauses (a marker file tells the test)
# before writing its second cache chunk, to be killed there.
RANK_CHILD = """
import sys, time
from pathlib import Path
import weights2data.features as features

saves = []

def save(self, rows, tensors, real=features.ChunkCache.save):
    if {pause!r} and len(saves) == 1:
        Path({marker!r}).write_text("")
        time.sleep(3600)
    saves.append(rows)
    real(self, rows, tensors)

features.ChunkCache.save = save
from weights2data.cli import main
sys.exit(main({argv!r}))
"""


def w2d_args(tmp_path: Path, name: str, cache: Path) -> list[str]:
    dirs = ["--corpus", CORPUS, "--results-dir", str(tmp_path / "runs"), "--exp-name", name]
    return [*SELECT.split(), *dirs, "--cache-dir", str(cache)]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def picks(tmp_path: Path, name: str) -> list[int]:
    return pq.read_table(tmp_path / "runs" / name / "selection.parquet")["corpus_row"].to_pylist()


def kill_rank_one_mid_featurisation(tmp_path: Path, argv: list[str]) -> None:
    """Two ranks; rank 1 is killed with SIGKILL with one of its two chunks written, then rank 0."""
    port, marker = str(free_port()), tmp_path / "paused"
    ranks = []
    for rank in range(2):
        code = RANK_CHILD.format(pause=rank == 1, marker=str(marker), argv=argv)
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        with open(tmp_path / f"rank{rank}.txt", "w") as log:
            ranks.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=log))
    deadline = time.time() + WAIT_S
    while not marker.exists():
        if any(p.poll() is not None for p in ranks) or time.time() > deadline:
            for p in ranks:
                p.kill()
            pytest.fail("rank 1 never paused:\n" + (tmp_path / "rank1.txt").read_text()[-3000:])
        time.sleep(0.2)
    for p in reversed(ranks):  # as torchrun does when one of its workers dies
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)


def test_torchrun_select_picks_as_one_process_and_resumes_a_killed_rank(
    tmp_path: Path, data_dir: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("W2D_DATA_DIR", str(data_dir))
    assert main(w2d_args(tmp_path, "one", fresh_cache)) == 0
    cache = tmp_path / "cache-two"  # a cache of its own: the ranks compute every row
    (cache / "models").mkdir(parents=True)
    for model in (fresh_cache / "models").iterdir():  # the tokenizer
        (cache / "models" / model.name).symlink_to(model.resolve())
    argv = w2d_args(tmp_path, "two", cache)
    kill_rank_one_mid_featurisation(tmp_path, argv)
    rank_one = [f for f in (cache / "hidden").glob("*/meta.json") if read_json(f)["rows"] == 1252]
    assert [p.name for p in rank_one[0].parent.glob("chunk_*")] == ["chunk_000000000.safetensors"]
    first = rank_one[0].parent / "chunk_000000000.safetensors"
    written = first.stat().st_mtime_ns
    assert not (tmp_path / "runs" / "two" / "selection.parquet").exists()

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "weights2data"]
    done = subprocess.run([*torchrun, *argv], env=child_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert first.stat().st_mtime_ns == written  # rank 1's finished chunk was read back, not redone
    assert len(list((cache / "hidden").glob("*/chunk_*.safetensors"))) == 4  # two per rank
    assert len(picks(tmp_path, "two")) == 12 and picks(tmp_path, "two") == picks(tmp_path, "one")

    def no_forward(*args, **kwargs):
        raise AssertionError("a row the ranks cached was computed again")

    monkeypatch.setattr(feature_cache, "_compute_chunks", no_forward)  # one process reads the ranks' rows
    assert main(w2d_args(tmp_path, "three", cache)) == 0
    assert picks(tmp_path, "three") == picks(tmp_path, "one")


def test_only_select_runs_under_torchrun(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", "--model", "tiny-test"]) == 2
    assert "only w2d select shards the corpus" in capsys.readouterr().err
    assert main([*SELECT.split(), "--corpus", CORPUS, "--path", "distill"]) == 2
    assert "--path distill is not supported across ranks" in capsys.readouterr().err
    assert main([*SELECT.split(), "--corpus", CORPUS, "--rounds", "2"]) == 2
    assert "--rounds 2 is not supported across ranks" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main([*SELECT.split(), "--corpus", CORPUS]) == 2
    assert "MASTER_ADDR / MASTER_PORT are unset: launch with torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["classification", "lm", "blocks"])
def test_aligned_shards_featurise_bit_for_bit_as_the_whole(kind: str, cache: Path, data_dir: Path) -> None:
    """What makes sharded picks exact: each shard's rows get exactly the whole corpus's features."""
    from weights2data.config import DataConfig, SelectConfig
    from weights2data.data import load_dataset, make_label_set
    from weights2data.models import load_model
    from weights2data.recover import corpus_gradients, lm_corpus_gradients

    base, tuned = load_model("tiny-test", cache=cache), load_model("tiny-test:1", cache=cache)
    texts = load_dataset("wiki_passages_64", data_dir=data_dir).train.texts
    sel = SelectConfig(k=4, grad_blocks=1 if kind == "blocks" else 0, precondition="none")  # moments: whole
    label_set = make_label_set(["A", "B", "C", "D"], base.tokenizer, "A,B,C,D")

    def gradients(part: list[str]):  # with the losses under both models, which the loss drop ranks by
        if kind == "lm":
            return lm_corpus_gradients(base, tuned, part, 16, "full", sel, None, base_losses=True)
        data = DataConfig(seq_len=16)
        return corpus_gradients(base, tuned, part, label_set, data, sel, None, base_losses=True)

    whole = gradients(texts)
    shards = [gradients(texts[s.start : s.stop]) for s in (shard_rows(64, Layout(r, 2)) for r in range(2))]
    for w, a, b in zip(
        whole.features.row_factors(torch.arange(64)),
        *(s.features.row_factors(torch.arange(len(s.features))) for s in shards),
        strict=True,
    ):
        assert torch.equal(w, torch.cat([a, b]))
    for name in ("losses", "base_losses"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(s, name) for s in shards])), name


# what each rank computes from the whole corpus: the head's preconditioners, the blocks' (with a
# 20-document pilot, split over the ranks) and random labels
CORPUS_WIDE = {
    "adam": {"precondition": "adam"},
    "kfac": {"precondition": "kfac"},
    "adam + blocks": {"precondition": "adam", "grad_blocks": 1},
    "random labels": {"precondition": "adam", "labels": "random"},
}


def corpus_wide_gradients(cache: Path, data_dir: Path, shard: Shard | None = None) -> dict:
    """The labels and features of wiki_passages_64 under each of CORPUS_WIDE: this rank's rows, or all."""
    import weights2data.block_gradients as block_gradients
    from weights2data.config import DataConfig, SelectConfig
    from weights2data.data import load_dataset, make_label_set
    from weights2data.models import load_model
    from weights2data.precondition import WHOLE
    from weights2data.recover import corpus_gradients

    block_gradients.PILOT_ROWS = 20
    base, tuned = load_model("tiny-test", cache=cache), load_model("tiny-test:1", cache=cache)
    texts = load_dataset("wiki_passages_64", data_dir=data_dir).train.texts
    label_set = make_label_set(["A", "B", "C", "D"], base.tokenizer, "A,B,C,D")
    rows, corpus = (range(64), WHOLE) if shard is None else (shard.rows, shard.corpus_slice())
    out = {}
    for name, options in CORPUS_WIDE.items():
        sel = SelectConfig(k=8, strategy="greedy", **options)
        grads = corpus_gradients(
            base,
            tuned,
            texts[rows.start : rows.stop],
            label_set,
            DataConfig(seq_len=16),
            sel,
            None,
            corpus=corpus,
        )
        out[name] = [grads.labels, *grads.features.row_factors(torch.arange(len(rows)))]
    return out


def corpus_wide_worker(rank: int, port: int, out: str, cache: str, data_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shard = Shard.of(64, Layout(rank, 2), torch.device("cpu"))
    torch.save(corpus_wide_gradients(Path(cache), Path(data_dir), shard), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_fit_preconditioners_and_draw_labels_over_the_whole_corpus(
    tmp_path: Path, cache: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank sees half the corpus; its labels and features are still those one process computes
    over all of it (Adam's and K-FAC's moments all-reduced, the blocks' pilot and the random labels
    drawn over every row)."""
    import weights2data.block_gradients as block_gradients

    monkeypatch.setattr(block_gradients, "PILOT_ROWS", 20)
    mp.spawn(corpus_wide_worker, args=(free_port(), str(tmp_path), str(cache), str(data_dir)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = corpus_wide_gradients(cache, data_dir)
    for name in CORPUS_WIDE:
        for w, a, b in zip(whole[name], ranks[0][name], ranks[1][name], strict=True):
            torch.testing.assert_close(torch.cat([a, b]), w, rtol=1e-5, atol=1e-6, msg=name)
