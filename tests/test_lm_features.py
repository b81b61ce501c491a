"""LM-head gradient features against materialised autograd gradients, and the LM recovery path end to end."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from weights2data import lm_features as lm_features_module
from weights2data.config import SelectConfig
from weights2data.data import encode_lm
from weights2data.errors import W2DError
from weights2data.features import forward_hidden, hidden_chunks, hidden_states
from weights2data.lm_features import (
    HeadView,
    KroneckerSketch,
    batch_terms,
    kron_factors,
    lm_features,
    scored_positions,
)
from weights2data.models import LoadedModel, tiny_test_model, untie_head
from weights2data.recover import lm_corpus_gradients
from weights2data.selection import BALANCED, STRATEGIES, SummedFeatures, select
from weights2data.train import lm_loss_sum
from weights2data.trajectory import interpolate

TEXTS = [
    "The team won the championship after a dramatic overtime goal in front of a home crowd.",
    "Stocks fell sharply as investors worried about interest rates.",
    "A new species of frog was discovered in the rainforest.",
    "The prime minister met foreign leaders at the summit on climate.",
    "The company reported record quarterly earnings on Tuesday, beating forecasts by a wide margin.",
    "Scientists launched a satellite.",
    "The striker signed a three-year contract with the club.",
    "Oil prices rose after the pipeline was shut down for repairs.",
    "Hi",
    "Elections were held peacefully across the country, observers said.",
]
SEQ_LEN = 16
PAIR_TEXTS = TEXTS[:8] + [  # near-duplicates: gradients with a clear cosine to their originals
    "The team won the championship after a dramatic overtime goal in front of a away crowd.",
    "Stocks fell sharply as investors worried about inflation.",
    "A new species of frog was discovered in the rainforest of Peru.",
]


@pytest.fixture(scope="module")
def pair(cache) -> tuple[LoadedModel, LoadedModel]:
    """Base (tied head) and a 'full finetune' that moved the tied embedding/head and the last block."""
    base = tiny_test_model(cache, seed=0)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-finetuned")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = finetuned.model.get_output_embeddings().weight
        w.add_(0.05 * torch.randn(w.shape, generator=gen))
        for p in finetuned.model.model.layers[-1].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    assert finetuned.model.get_output_embeddings().weight is finetuned.model.get_input_embeddings().weight
    return base, finetuned


def autograd_grads(model: torch.nn.Module, encoded, mode: str) -> torch.Tensor:
    """(N, V·d) float64 gradients of each document's summed next-token loss w.r.t. the head."""
    weight0 = model.get_output_embeddings().weight.detach().double()
    grads = []
    for i in range(len(encoded)):
        row = encoded.subset(slice(i, i + 1))
        hidden = forward_hidden(model, row).double()  # (1, T, d)
        weight = weight0.clone().requires_grad_(True)
        loss, n, _ = lm_loss_sum(hidden @ weight.T, row, mode)
        if n:
            loss.backward()
            grads.append(weight.grad.reshape(-1))
        else:
            grads.append(torch.zeros(weight0.numel(), dtype=torch.float64))
    return torch.stack(grads)


def delta_of(base, finetuned) -> torch.Tensor:
    wb = base.model.get_output_embeddings().weight.detach().double()
    return (wb - finetuned.model.get_output_embeddings().weight.detach().double()).reshape(-1)


def assert_terms_match(feats, dense: torch.Tensor, delta: torch.Tensor) -> None:
    """The float32 factored g·δ and |g|² against float64 autograd gradients `dense` (N, V·d).

    g·δ is ~1e-3 of |g||δ| here (a near-orthogonal sum that cancels), so its float32 rounding is
    bounded relative to |g||δ|, not to the dot itself (float32's epsilon is 1.2e-7).
    """
    bound = dense.norm(dim=1) * delta.norm()
    assert ((feats.target_dots.double() - dense @ delta).abs() <= 1e-7 * bound).all()
    torch.testing.assert_close(feats.sq_norms.double(), dense.square().sum(1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["full", "last"])
def test_exact_terms_match_autograd(pair, mode) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    out = lm_features(
        base, finetuned, encoded, lm_loss=mode, dtype=torch.float32, batch_size=3, progress=False
    )
    dense = autograd_grads(finetuned.model, encoded, mode)
    delta = delta_of(base, finetuned)
    feats = out.features
    assert_terms_match(feats, dense, delta)
    assert feats.delta_sq_norm == pytest.approx(float(delta.square().sum()), rel=1e-6)
    # the scored positions and mean losses are train.lm_loss_sum's
    for i in range(len(TEXTS)):
        row = encoded.subset(slice(i, i + 1))
        logits = finetuned.model(
            input_ids=row.input_ids, attention_mask=row.attention_mask, position_ids=row.position_ids
        ).logits
        loss, n, _ = lm_loss_sum(logits, row, mode)
        assert int(out.tokens[i]) == n
        if n:
            assert float(out.losses[i]) == pytest.approx(float(loss.detach()) / n, rel=1e-4)
        else:
            assert torch.isnan(out.losses[i])
    assert int(out.tokens[TEXTS.index("Hi")]) == 0  # one token: nothing to predict
    if mode == "last":
        assert out.tokens.max() == 1


def test_sketch_of_a_materialised_gradient_equals_the_factored_sketch(pair) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS[:4], SEQ_LEN)
    out = lm_features(base, finetuned, encoded, dim=256, seed=3, dtype=torch.float32, progress=False)
    dense = autograd_grads(finetuned.model, encoded, "full").float()
    vocab, d = finetuned.model.get_output_embeddings().weight.shape
    sketch = KroneckerSketch(vocab, d, 256, seed=3)
    explicit = torch.stack([sketch.matrix(g.reshape(vocab, d)) for g in dense])
    torch.testing.assert_close(out.features.grads, explicit, rtol=1e-3, atol=1e-4)
    delta = delta_of(base, finetuned).reshape(vocab, d).float()
    torch.testing.assert_close(out.features.delta, sketch.matrix(delta))


def _pair_terms(pair, mode: str):
    """Hidden states, views and autograd truth for the pairwise tests (shared across seeds)."""
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, PAIR_TEXTS, SEQ_LEN)
    hidden = hidden_states(finetuned, encoded)
    dense = autograd_grads(finetuned.model, encoded, mode)
    keep = dense.square().sum(1) > 0
    return base, finetuned, encoded, hidden, dense, keep


@pytest.mark.parametrize("mode", ["full", "last"])
def test_sketched_inner_products_are_unbiased_and_accurate(pair, mode) -> None:
    base, finetuned, encoded, hidden, dense, keep = _pair_terms(pair, mode)
    truth = dense @ dense.T  # (N, N)
    norms = truth.diagonal().clamp_min(1e-30).sqrt()
    cos = truth / (norms[:, None] * norms[None, :])
    view = HeadView(finetuned.model.get_output_embeddings().weight.detach())
    delta = delta_of(base, finetuned).float().reshape(view.weight.shape)
    vocab, d = view.weight.shape
    seeds = 50 if mode == "full" else 25
    estimates = []
    for seed in range(seeds):
        sketch = KroneckerSketch(vocab, d, 4096, seed=seed)
        terms = batch_terms([hidden], [view], encoded.input_ids, encoded.attention_mask, delta, sketch, mode)
        phi = terms.sketch
        estimates.append((phi @ phi.T).double())
    stack = torch.stack(estimates)  # (seeds, N, N)
    pairs = keep[:, None] & keep[None, :] & ~torch.eye(len(PAIR_TEXTS), dtype=torch.bool)
    scale = norms[:, None] * norms[None, :]
    # unbiased: the mean over the seeds is within 4 standard errors of the truth
    mean, stderr = stack.mean(0), stack.std(0) / seeds**0.5
    assert ((mean - truth).abs() <= 4 * stderr + 1e-6 * scale)[pairs].all()
    # mean error over seeds, relative to ‖g_i‖‖g_j‖, is small
    assert ((mean - truth).abs() / scale)[pairs].max() < 0.02
    # at dimension 4096, pairs with |cos| > 0.3 are within 10% relative error (typical seed)
    strong = pairs & (cos.abs() > 0.3)
    assert strong.any()
    rel = ((stack - truth).abs() / truth.abs())[:, strong]  # (seeds, pairs)
    assert rel.median() < 0.10
    assert (rel < 0.10).float().mean() > 0.8
    print(
        f"{mode}: {int(strong.sum())} strong pairs, median rel err {float(rel.median()):.4f}, "
        f"within 10%: {float((rel < 0.10).float().mean()):.3f}"
    )


def test_grad_at_both_is_the_sum_of_the_two_gradients(pair) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    kw = {"dtype": torch.float32, "dim": 64, "seed": 1, "progress": False}
    at = {g: lm_features(base, finetuned, encoded, grad_at=g, **kw) for g in ("finetuned", "base", "both")}
    total = autograd_grads(finetuned.model, encoded, "full") + autograd_grads(base.model, encoded, "full")
    summed = at["finetuned"].features.grads + at["base"].features.grads
    torch.testing.assert_close(at["both"].features.grads, summed, rtol=1e-4, atol=1e-5)
    assert_terms_match(at["both"].features, total, delta_of(base, finetuned))
    for g in ("base", "both"):  # the loss is always the finetuned model's
        torch.testing.assert_close(at[g].losses, at["finetuned"].losses, equal_nan=True)


def test_lm_pseudo_experts_concatenate_one_part_per_point(pair) -> None:
    """P = 2, both ends of each segment: four parts, each lm_features of its segment and end."""
    base, finetuned = pair
    cfg = SelectConfig(k=3, pseudo_experts=2, grad_at="both", path_combine="concat", projection_dim=64)
    grads = lm_corpus_gradients(base, finetuned, TEXTS, SEQ_LEN, "full", cfg, None)
    assert isinstance(grads.features, SummedFeatures) and len(grads.features.parts) == 4
    mid = interpolate(base, finetuned, 0.5)
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    expected = lm_features(mid, finetuned, encoded, grad_at="base", dim=64, progress=False).features
    torch.testing.assert_close(grads.features.parts[2].target_dots, expected.target_dots)
    torch.testing.assert_close(grads.features.parts[2].grads, expected.grads)
    summed = SelectConfig(k=3, pseudo_experts=2)
    with pytest.raises(W2DError, match="concat"):
        lm_corpus_gradients(base, finetuned, TEXTS, SEQ_LEN, "full", summed, None)


def test_float16_cache_streams_chunks_and_resumes(pair, tmp_path, monkeypatch) -> None:
    import weights2data.features as features

    base, finetuned = pair
    monkeypatch.setattr(features, "CHUNK_ROWS", 4)  # three chunks for ten documents
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    chunks = list(hidden_chunks(finetuned, encoded, cache_root=tmp_path, dtype=torch.float16))
    assert [c.shape[0] for c in chunks] == [4, 4, 2] and all(c.dtype == torch.float16 for c in chunks)
    folder = next((tmp_path / "hidden").iterdir())
    assert len(list(folder.glob("chunk_*.safetensors"))) == 3
    exact = hidden_states(finetuned, encoded)
    torch.testing.assert_close(torch.cat(chunks).float(), exact, rtol=2e-3, atol=2e-3)
    (folder / "chunk_000000004.safetensors").unlink()  # a killed run: one chunk missing
    again = lm_features(base, finetuned, encoded, cache_root=tmp_path, progress=False)
    direct = lm_features(base, finetuned, encoded, dtype=torch.float32, progress=False)
    torch.testing.assert_close(again.features.target_dots, direct.features.target_dots, rtol=2e-2, atol=1e-3)
    assert again.timings["sketch"] == "64x64"


def test_lm_features_are_cached_and_reused_without_the_model(pair, tmp_path, monkeypatch) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    kw = dict(dim=256, seed=2, cache_root=tmp_path, dtype=torch.float32, progress=False)
    first = lm_features(base, finetuned, encoded, **kw)
    assert len(list((tmp_path / "lm-features").glob("*/chunk_*.safetensors"))) == 1

    def no_forward(*_args, **_kwargs):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(lm_features_module, "HiddenStates", no_forward)
    again = lm_features(base, finetuned, encoded, **kw)
    assert again.timings["cached"] is True
    for name in ("grads", "delta", "target_dots", "sq_norms"):
        torch.testing.assert_close(getattr(again.features, name), getattr(first.features, name))
    assert again.features.delta_sq_norm == first.features.delta_sq_norm
    torch.testing.assert_close(again.losses, first.losses, equal_nan=True)
    assert torch.equal(again.tokens, first.tokens)
    with pytest.raises(AssertionError, match="ran again"):  # another sketch seed is another key
        lm_features(base, finetuned, encoded, **{**kw, "seed": 3})


def test_every_strategy_runs_in_lm_mode(pair) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    out = lm_features(base, finetuned, encoded, dim=256, dtype=torch.float32, progress=False)
    base_losses = out.losses + torch.linspace(0, 1, len(TEXTS))  # a stand-in: only loss_drop reads it
    for strategy in STRATEGIES:
        if strategy in BALANCED:  # they need labels
            continue
        sel = select(
            strategy,
            out.features,
            4,
            losses=out.losses,
            base_losses=base_losses,
            batch_size=2,
            progress=False,
        )
        assert len(set(sel.indices.tolist())) == 4, strategy
    lowest = select("p_min", out.features, 3, losses=out.losses, progress=False)
    finite = out.losses.nan_to_num(float("inf"))
    assert lowest.indices.tolist() == finite.argsort()[:3].tolist()
    highest = select("p_max", out.features, 3, losses=out.losses, progress=False)
    assert out.losses.isnan().any() and not out.losses[highest.indices].isnan().any()  # empty documents last


def test_strategies_that_need_labels_are_refused_in_lm_mode(pair) -> None:
    from weights2data.config import SelectConfig
    from weights2data.recover import lm_corpus_gradients, recover

    base, finetuned = pair
    cfg = SelectConfig(k=3, projection_dim=64)
    grads = lm_corpus_gradients(base, finetuned, TEXTS, SEQ_LEN, "full", cfg, None)
    assert grads.labels is None and grads.base_losses is None  # computed only when asked
    for strategy in ("topk_balanced", "loss_drop_balanced"):
        with pytest.raises(W2DError, match=f"{strategy} balances labels"):
            recover(grads, TEXTS, None, SelectConfig(k=3, strategy=strategy))
    rec = recover(grads, TEXTS, None, SelectConfig(k=3, strategy="greedy"), progress=False)
    assert rec.labels is None and len(rec.texts) == 3


def reference_losses(model: torch.nn.Module, encoded, mode: str) -> torch.Tensor:
    """(N,) each document's mean next-token loss from the full model's logits (NaN: none scored)."""
    out = []
    with torch.no_grad():
        for i in range(len(encoded)):
            row = encoded.subset(slice(i, i + 1))
            loss, n, _ = lm_loss_sum(
                model(row.input_ids, attention_mask=row.attention_mask).logits, row, mode
            )
            out.append(float(loss) / n if n else math.nan)
    return torch.tensor(out)


@pytest.mark.parametrize("mode", ["full", "last"])
def test_lm_loss_drop_ranks_by_the_base_loss_minus_the_finetuned_loss(
    pair, tmp_path, monkeypatch, mode
) -> None:
    from weights2data.recover import recover

    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)
    cfg = SelectConfig(k=4, strategy="loss_drop", projection_dim=64)
    grads = lm_corpus_gradients(base, finetuned, TEXTS, SEQ_LEN, mode, cfg, tmp_path)
    at_base, at_tuned = (
        reference_losses(base.model, encoded, mode),
        reference_losses(finetuned.model, encoded, mode),
    )
    assert torch.allclose(grads.base_losses, at_base, atol=1e-3, equal_nan=True)  # float16 hidden states
    assert torch.allclose(grads.losses, at_tuned, atol=1e-3, equal_nan=True)
    rec = recover(grads, TEXTS, None, cfg, progress=False)
    drop = (at_base - at_tuned).nan_to_num(-math.inf)
    assert rec.rows.tolist() == drop.argsort(descending=True)[:4].tolist()
    assert at_base.isnan().any() and not at_base[rec.rows].isnan().any()  # "Hi" has no scored token
    tokens = scored_positions(encoded.attention_mask, mode).sum(1)
    assert grads.tokens.tolist() == tokens.tolist()
    every = len(TEXTS)  # the whole order, where the mean and the sum differ
    per_document = recover(
        grads, TEXTS, None, replace(cfg, k=every, loss_drop_per="document"), progress=False
    )
    summed = ((at_base - at_tuned) * tokens).nan_to_num(-math.inf)  # log p1(x) / p0(x)
    assert per_document.rows.tolist() == summed.argsort(descending=True, stable=True).tolist()
    per_token = recover(grads, TEXTS, None, replace(cfg, k=every), progress=False)
    assert per_document.rows.tolist() != per_token.rows.tolist() or mode == "last"  # one token each

    def no_head_pass(*_args, **_kwargs):
        raise AssertionError("the base's losses were computed again")

    monkeypatch.setattr(lm_features_module, "view_loss_sum", no_head_pass)
    again = lm_corpus_gradients(base, finetuned, TEXTS, SEQ_LEN, mode, cfg, tmp_path)
    torch.testing.assert_close(again.base_losses, grads.base_losses, rtol=0, atol=0, equal_nan=True)


def test_a_per_document_loss_drop_is_refused_for_a_classifier() -> None:
    from weights2data.recover import CorpusGradients, drop_losses

    grads = CorpusGradients(None, torch.zeros(3), torch.ones(3), {}, base_losses=torch.full((3,), 2.0))
    document = SelectConfig(k=2, loss_drop_per="document")
    assert drop_losses(grads, document, "p_min")[0] is grads.losses  # only the loss drop reads it
    with pytest.raises(W2DError, match="one label token: leave it at token"):
        drop_losses(grads, document, "loss_drop")
    with pytest.raises(W2DError, match="unknown loss_drop_per .sentence."):
        SelectConfig(loss_drop_per="sentence")


def test_helpers() -> None:
    assert kron_factors(4096) == (64, 64) and kron_factors(512) == (32, 16) and kron_factors(7) == (7, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert scored_positions(mask, "full").tolist() == [
        [True, True, False, False],
        [False] * 4,
        [True, True, True, False],
    ]
    assert scored_positions(mask, "last").tolist() == [
        [False, True, False, False],
        [False] * 4,
        [False, False, True, False],
    ]
    with pytest.raises(W2DError):
        scored_positions(mask, "middle")
    with pytest.raises(W2DError):
        KroneckerSketch(10, 4, 16, factors=(3, 5))


def test_untied_head_finetune_uses_the_head_difference(cache) -> None:
    """A head-scope finetune unties the head: Δ is lm_head(base, tied) − lm_head(finetuned)."""
    base = tiny_test_model(cache, seed=0)
    finetuned = tiny_test_model(cache, seed=0)
    untie_head(finetuned.model)
    with torch.no_grad():
        finetuned.model.lm_head.weight.mul_(1.01)
    encoded = encode_lm(base.tokenizer, TEXTS[:3], SEQ_LEN)
    out = lm_features(base, finetuned, encoded, dim=16, dtype=torch.float32, progress=False)
    delta = (base.model.get_output_embeddings().weight - finetuned.model.lm_head.weight).detach()
    assert out.features.delta_sq_norm == pytest.approx(float(delta.double().square().sum()), rel=1e-6)
    hidden = hidden_states(finetuned, encoded)
    probs = F.softmax(hidden @ finetuned.model.lm_head.weight.detach().T, -1)
    assert torch.isfinite(probs).all() and torch.isfinite(out.features.target_dots).all()


def test_cli_run_lm_end_to_end(cli_env: Path) -> None:
    from weights2data.cli import main

    code = main(
        [
            "run",
            "--task",
            "lm",
            "--model",
            "tiny-test",
            "--dataset",
            "imdb_24",
            "--select_seed_dataset",
            "wiki_passages_40",
            "-k",
            "8",
            "--seq-len",
            "12",
            "--train-scope",
            "head",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--max-eval-rows",
            "16",
            "--eval-epochs",
            "1",
            "--strategies",
            "greedy,topk,p_min",
            "--select_projection_dim",
            "256",
            "--skip-similarity",
            "--exp_name",
            "lm",
        ]
    )
    assert code == 0
    results = json.loads((cli_env / "runs" / "lm" / "results.json").read_text())
    assert results["task"] == "lm" and results["metric"] == "loss"
    rows = {r["model"]: r for r in results["table"]}
    assert set(rows) == {"expert", "greedy", "topk", "p_min", "random"}
    for row in rows.values():
        assert row["best_epoch_test_perplexity"] == pytest.approx(math.exp(row["best_epoch_test"]), rel=1e-6)
    assert "closure_best_epoch_test" in rows["greedy"]
    assert "closure_perplexity_best_epoch_test" in rows["greedy"]
    assert results["selections"]["greedy"]["config"]["k"] == 8


def test_cli_select_lm(cli_env: Path, caplog) -> None:
    from weights2data.cli import main

    finetune = ["finetune", "--model", "tiny-test", "--dataset", "imdb_16", "--task", "lm", "--seq-len", "12",
                "--train-scope", "head", "--lr", "1e-3", "--exp-name", "ft"]  # fmt: skip
    assert main(finetune) == 0
    select = ["select", "--base", "tiny-test", "--finetuned", str(cli_env / "runs" / "ft" / "model"),
              "--corpus", "wiki_passages_30", "-k", "5", "--task", "lm"]  # fmt: skip
    with caplog.at_level("INFO", logger="weights2data"):
        assert main([*select, "--seq-len", "12", "--projection-dim", "64", "--exp-name", "sel"]) == 0
    assert "--strategy auto: loss_drop" in [r.getMessage() for r in caplog.records]
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert summary["task"] == "lm" and "label_distribution" not in summary
    assert summary["strategy"] == "loss_drop"  # what auto runs for language modelling
    assert main([*select, "--strategy", "topk_balanced", "--exp-name", "sel2"]) == 2
    assert main([*select, "--seq-len", "12", "--strategy", "loss_drop", "--exp-name", "drop"]) == 0
    drop = json.loads((cli_env / "runs" / "drop" / "summary.json").read_text())
    assert drop["strategy"] == "loss_drop" and drop["k"] == 5
    picks = [pq.read_table(cli_env / "runs" / name / "selection.parquet") for name in ("sel", "drop")]
    assert picks[0]["corpus_row"].to_pylist() == picks[1]["corpus_row"].to_pylist()
