"""Contrastive candidate generation: the contrast, the sampler, determinism and the commands."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import weights2data.generate as generate_module
from conftest import nudged
from weights2data.cli import main
from weights2data.config import GenerateConfig
from weights2data.data import Split
from weights2data.errors import W2DError
from weights2data.generate import (
    OPENINGS,
    Labeller,
    contrastive_logits,
    decode,
    generate,
    generate_cached,
    generate_per_label,
    next_tokens,
    nucleus,
    openings,
    with_generated,
)
from weights2data.models import LoadedModel

NO_STOP = torch.tensor([-1])  # no token ends a row early


@pytest.fixture
def pair(tiny: LoadedModel) -> tuple[LoadedModel, LoadedModel]:
    """The tiny model and a nearby 'finetune' of it (every weight nudged)."""
    return tiny, nudged(tiny, 0.05)


def prefix(tokenizer, text: str = "The", rows: int = 3) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]] * rows)


@torch.no_grad()
def last_logits(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """A direct forward of the whole sequence, no cache."""
    return model.model(input_ids=ids).logits[:, -1].float()


def test_contrastive_logits_match_direct_forwards_at_each_step(pair) -> None:
    base, tuned = pair
    cfg = GenerateConfig(alpha=0.7)
    seen = []

    def pick(l1: torch.Tensor, l0: torch.Tensor) -> torch.Tensor:
        seen.append((l1, l0))
        return next_tokens(l1, l0, cfg, torch.Generator().manual_seed(len(seen)))

    start = prefix(base.tokenizer)
    ids = decode(base, tuned, start, 5, pick, NO_STOP)
    assert ids.shape == (3, start.shape[1] + 5) and torch.equal(ids[:, : start.shape[1]], start)
    for step, (l1, l0) in enumerate(seen):
        so_far = ids[:, : start.shape[1] + step]
        expected = last_logits(tuned, so_far) - 0.7 * last_logits(base, so_far)
        torch.testing.assert_close(contrastive_logits(l1, l0, 0.7), expected, atol=1e-4, rtol=1e-4)


def test_alpha_zero_is_plain_sampling_from_the_finetuned_model(pair) -> None:
    base, tuned = pair
    cfg = GenerateConfig(alpha=0.0, plausibility=0.0, top_p=1.0, temperature=1.0)
    start = prefix(base.tokenizer, "In", rows=4)
    pick = partial(next_tokens, cfg=cfg, generator=torch.Generator().manual_seed(3))
    ids = decode(base, tuned, start, 4, pick, NO_STOP)
    reference, generator = start, torch.Generator().manual_seed(3)
    for _ in range(4):
        probs = last_logits(tuned, reference).softmax(-1)
        reference = torch.cat([reference, torch.multinomial(probs, 1, generator=generator)], 1)
    assert torch.equal(ids, reference)


def test_nucleus_and_plausibility_keep_the_likely_tokens() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(nucleus(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(nucleus(logits, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(nucleus(logits, 1e-6)).tolist() == [[True, False, False, False]]
    # the base finds token 3 far rarer: the contrast favours it, the plausibility floor (p1 ≥ 0.5 · max) not
    base = torch.tensor([[0.3, 0.3, 0.3, 1e-6]]).log()
    cfg = GenerateConfig(alpha=1.0, plausibility=0.5, top_p=1.0)
    drawn = {next_tokens(logits, base, cfg, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert drawn == {0, 1}
    assert (
        next_tokens(
            logits, base, GenerateConfig(alpha=1.0, plausibility=0.0, top_p=1.0), torch.Generator()
        ).item()
        == 3
    )


def test_same_seed_same_texts(pair) -> None:
    base, tuned = pair
    cfg = GenerateConfig(docs=6, batch_size=3, prefixes="The,A", seed=5)
    texts = generate(base, tuned, cfg, seq_len=6, progress=False)
    assert texts == generate(base, tuned, cfg, seq_len=6, progress=False)
    assert texts != generate(base, tuned, replace(cfg, seed=6), 6, progress=False)
    assert len(texts) == 6 and all(text.startswith(("The", "A")) for text in texts)
    assert all(len(base.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 8 for t in texts)


def test_openings(tmp_path: Path, tiny: LoadedModel) -> None:
    assert openings(None) == list(OPENINGS)
    assert openings(" Breaking:, Review ,") == ["Breaking:", "Review"]
    (tmp_path / "openings.txt").write_text("Once upon a time\n\nDear\n")
    assert openings(str(tmp_path / "openings.txt")) == ["Once upon a time", "Dear"]
    with pytest.raises(W2DError, match="leave room"):
        generate(tiny, tiny, GenerateConfig(docs=1, prefixes="Once upon a time"), seq_len=3, progress=False)
    with pytest.raises(W2DError, match="top_p"):
        GenerateConfig(top_p=0.0)


def test_with_generated_appends_and_caches(pair, tmp_path: Path) -> None:
    base, tuned = pair
    corpus = Split(["a passage", "another passage"], None)
    cfg = GenerateConfig(docs=3, prefixes="The")
    merged, sources = with_generated(corpus, base, tuned, cfg, 5, tmp_path)
    assert merged.texts[:2] == corpus.texts and len(merged) == 5
    assert sources == ["corpus", "corpus", "generated", "generated", "generated"]
    (cached,) = (tmp_path / "generated").glob("*.json")
    saved = json.loads(cached.read_text())
    assert saved["texts"] == merged.texts[2:] and saved["settings"]["seq_len"] == 5
    assert with_generated(corpus, base, tuned, cfg, 5, tmp_path)[0].texts == merged.texts  # from the cache
    assert with_generated(corpus, base, tuned, None, 5, tmp_path) == (corpus, ["corpus", "corpus"])


def by_length(texts: list[str]) -> torch.Tensor:
    """A stand-in classifier: label = the text's length mod 2."""
    return torch.tensor([len(text) % 2 for text in texts])


def test_per_label_keeps_equal_shares_of_the_labels_drawn(pair) -> None:
    base, tuned = pair
    cfg = GenerateConfig(docs=7, batch_size=4, prefixes="The,A", seed=3, per_label=True, max_draws=200)
    texts = generate_per_label(base, tuned, cfg, 8, Labeller(by_length, 2, "len"), progress=False)
    assert by_length(texts).tolist() == [0] * 4 + [1] * 3  # grouped by label, the first one more
    first_round = generate(base, tuned, replace(cfg, per_label=False), 8, progress=False)
    for label, kept in ((0, texts[:4]), (1, texts[4:])):  # round 0 is generate's own draw, kept in order
        firsts = [text for text in first_round if len(text) % 2 == label][: len(kept)]
        assert firsts and kept[: len(firsts)] == firsts


def test_per_label_stops_at_max_draws_and_says_which_label_is_short(pair, caplog) -> None:
    base, tuned = pair
    drawn = []

    def all_zero(texts: list[str]) -> torch.Tensor:
        drawn.extend(texts)
        return torch.zeros(len(texts), dtype=torch.long)

    cfg = GenerateConfig(docs=4, batch_size=2, prefixes="The", per_label=True, max_draws=10)
    texts = generate_per_label(base, tuned, cfg, 6, Labeller(all_zero, 2, "zero"), progress=False)
    assert len(texts) == 2 and len(drawn) == 10  # label 1 never drawn: its share stays empty
    assert "short of their shares" in caplog.text and "[1]" in caplog.text


def test_per_label_needs_a_labeller_and_caches_by_it(pair, tmp_path: Path) -> None:
    base, tuned = pair
    cfg = GenerateConfig(docs=4, prefixes="The", per_label=True, max_draws=40)
    with pytest.raises(W2DError, match="needs a classifier"):
        generate_cached(base, tuned, cfg, 6, tmp_path)
    texts = generate_cached(base, tuned, cfg, 6, tmp_path, Labeller(by_length, 2, "len"))
    assert generate_cached(base, tuned, cfg, 6, tmp_path, Labeller(by_length, 2, "len")) == texts
    generate_cached(base, tuned, cfg, 6, tmp_path, Labeller(by_length, 2, "other key"))
    saved = [json.loads(path.read_text())["settings"] for path in (tmp_path / "generated").glob("*.json")]
    assert sorted(s.get("labels", "") for s in saved if s["per_label"]) == ["len", "other key"]


def test_a_killed_per_label_run_resumes_from_its_finished_rounds(pair, tmp_path: Path, monkeypatch) -> None:
    base, tuned = pair
    cfg = GenerateConfig(docs=6, batch_size=2, prefixes="The", seed=1, per_label=True, max_draws=60)
    labeller = Labeller(by_length, 2, "len")
    texts = generate_cached(base, tuned, cfg, 8, tmp_path, labeller)
    saved = {p: json.loads(p.read_text())["settings"] for p in (tmp_path / "generated").glob("*.json")}
    (final,) = [path for path, settings in saved.items() if settings["per_label"]]
    assert len(saved) > 1  # the result and each round, cached as an unconditional draw
    plain = GenerateConfig(docs=6, batch_size=2, prefixes="The", seed=1)
    assert generate_cached(base, tuned, plain, 8, tmp_path) == generate(base, tuned, plain, 8, progress=False)
    assert len(list((tmp_path / "generated").glob("*.json"))) == len(saved)  # --generate reuses round 0
    final.unlink()  # killed after its last round, before the result was written
    monkeypatch.setattr(
        generate_module, "generate", lambda *a, **k: pytest.fail("a finished round was redrawn")
    )
    assert generate_cached(base, tuned, cfg, 8, tmp_path, labeller) == texts


def test_generate_command(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--base", "tiny-test", "--finetuned", "tiny-test:1", "-n", "4", "--seq-len", "6",
            "--alpha", "0.8", "--prefixes", "The,A", "--exp-name", "gen"]  # fmt: skip
    assert main(args) == 0
    table = pq.read_table(cli_env / "runs" / "gen" / "generated.parquet").to_pydict()
    assert len(table["text"]) == 4 and table["source"] == ["generated"] * 4
    assert all(text.startswith(("The", "A")) for text in table["text"])
    summary = json.loads((cli_env / "runs" / "gen" / "summary.json").read_text())
    assert (
        summary["docs"] == 4 and summary["settings"]["alpha"] == 0.8 and summary["settings"]["seq_len"] == 6
    )
    assert "generated 4 documents" in capsys.readouterr().out
    assert main(args[:5] + ["--exp-name", "none"]) == 2  # no -n
    assert "needs -n" in capsys.readouterr().err


def test_select_marks_generated_picks(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["select", "--base", "tiny-test", "--finetuned", "tiny-test:1", "--label-set", "A,B",
            "--corpus", "wiki_passages_10", "-k", "10", "--generate", "8", "--seq-len", "8",
            "--exp-name", "sel"]  # fmt: skip
    assert main(args) == 0
    table = pq.read_table(cli_env / "runs" / "sel" / "selection.parquet").to_pydict()
    sources = ["generated" if row >= 10 else "corpus" for row in table["corpus_row"]]
    assert table["source"] == sources and "generated" in sources
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert summary["generated_candidates"] == 8 and summary["corpus_size"] == 18
    assert summary["generated_picks"] == sources.count("generated")
    assert sum(summary["generated_labels"].values()) == 8 and set(summary["generated_labels"]) == {"A", "B"}
    assert "generated:" in capsys.readouterr().out


def test_select_generates_per_label(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["select", "--base", "tiny-test", "--finetuned", "tiny-test:1", "--label-set", "A,B",
            "--corpus", "wiki_passages_10", "-k", "10", "--generate", "6", "--generate-per-label",
            "--generate-max-draws", "60", "--seq-len", "8", "--exp-name", "per-label"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((cli_env / "runs" / "per-label" / "summary.json").read_text())
    assert 0 < summary["generated_candidates"] <= 6
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base", "tiny-test", "--finetuned", "tiny-test:1", "-n", "4", "--per-label"])
    assert (
        exit_info.value.code == 2 and "--per-label" in capsys.readouterr().err
    )  # w2d generate has no label set to condition on


def test_generate_help(capsys: pytest.CaptureFixture) -> None:
    for command, flags in {
        "generate": ["--base", "--finetuned", "-n", "--alpha", "--temperature", "--top-p", "--seed",
                     "--seq-len", "--prefixes", "--plausibility"],
        "select": ["--generate", "--generate-alpha", "--generate-prefixes"],
        "run": ["--generate", "--generate-top-p"],
    }.items():  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), command


def test_run_marks_generated_picks(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["run", "--model", "tiny-test", "--dataset", "ag_news_32", "--corpus", "wiki_passages_16",
            "-k", "8", "--eval-epochs", "1", "--max-eval-rows", "16", "--skip-similarity",
            "--train-scope", "head", "--lr", "1e-2", "--seq-len", "8", "--generate", "8",
            "--exp-name", "run"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((cli_env / "runs" / "run" / "results.json").read_text())
    for name in ("auto", "random"):  # the default strategy, by its name
        summary = results["selections"][name]
        table = pq.read_table(cli_env / "runs" / "run" / f"selection-{name}" / "selection.parquet")
        assert summary["generated_candidates"] == 8 and summary["corpus_size"] == 24
        assert table.column("source").to_pylist().count("generated") == summary["generated_picks"]
    assert "generated documents among the 8 picks" in capsys.readouterr().out
    per_label = ["--generate-per-label", "--generate-max-draws", "64", "--exp-name", "run-per-label"]
    assert main(args[:-2] + per_label) == 0  # the expert's own labels: 2 of AG News's 4 each, or fewer
    results = json.loads((cli_env / "runs" / "run-per-label" / "results.json").read_text())
    made = results["selections"]["auto"]
    assert 0 < made["generated_candidates"] == sum(made["generated_labels"].values()) <= 8
    assert max(made["generated_labels"].values()) <= 2  # no label above its equal share
    assert "candidates by label" in capsys.readouterr().out
