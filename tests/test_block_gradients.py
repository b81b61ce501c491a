"""Block gradients (--grad-blocks) against autograd gradients, and the select paths using them."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from weights2data import block_gradients
from weights2data import features as features_module
from weights2data.block_gradients import LayerSketch, block_features, first_block, layer_sketches, pilot_rows
from weights2data.config import DataConfig, SelectConfig
from weights2data.data import encode_classification, encode_lm, make_label_set
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, decoder_layers, tiny_test_model, untie_head
from weights2data.precondition import CorpusSlice, factored_scales
from weights2data.recover import corpus_gradients, lm_corpus_gradients, recover
from weights2data.selection import STRATEGIES, DenseFeatures, SummedFeatures, select
from weights2data.store import read_json
from weights2data.train import lm_loss_sum

TEXTS = [
    "The team won the championship after a dramatic overtime goal.",
    "Stocks fell sharply as investors worried about interest rates.",
    "A new species of frog was discovered in the rainforest.",
    "The prime minister met foreign leaders at the summit.",
    "The company reported record quarterly earnings on Tuesday.",
    "Scientists launched a satellite.",
    "The striker signed a three-year contract with the club.",
    "Oil prices rose after the pipeline was shut down.",
    "Hi",
    "Elections were held peacefully across the country.",
]
SEQ_LEN = 12
TOKEN_IDS = [100, 101, 102, 103]  # four label rows of the head


@pytest.fixture(scope="module")
def pair(cache) -> tuple[LoadedModel, LoadedModel]:
    """Base and a finetune that moved the (untied) head and the last block, as top:1 would."""
    base = tiny_test_model(cache, seed=0)
    untie_head(base.model)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-top1")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        finetuned.model.lm_head.weight.add_(
            0.05 * torch.randn(finetuned.model.lm_head.weight.shape, generator=gen)
        )
        for p in finetuned.model.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return base, finetuned


def classification_loss(finetuned: LoadedModel, labels: torch.Tensor):
    rows = finetuned.model.lm_head.weight.detach()[TOKEN_IDS]

    def loss(final: torch.Tensor, _batch, index: slice) -> torch.Tensor:
        return F.cross_entropy(final[:, -1] @ rows.T, labels[index], reduction="sum")

    return loss


def autograd_block_grads(finetuned: LoadedModel, encoded, loss_of, start: int) -> torch.Tensor:
    """(N, P) float64 per-document gradients w.r.t. every linear weight of blocks start.., in sketch order."""
    model = copy.deepcopy(finetuned.model).double()
    model.requires_grad_(False)
    weights = [
        m.weight
        for layer in decoder_layers(model)[start:]
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    out = []
    for i in range(len(encoded)):
        row = encoded.subset(slice(i, i + 1))
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        final = model.base_model(
            input_ids=row.input_ids, attention_mask=row.attention_mask, position_ids=row.position_ids
        ).last_hidden_state
        loss = loss_of(model, final, row, slice(i, i + 1))
        if loss.requires_grad:
            loss.backward()
        out.append(
            torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).reshape(-1) for w in weights])
        )
    return torch.stack(out)


def block_delta(base: LoadedModel, finetuned: LoadedModel, start: int) -> torch.Tensor:
    parts = []
    for a, b in zip(decoder_layers(base.model)[start:], decoder_layers(finetuned.model)[start:], strict=True):
        for ma, mb in zip(a.modules(), b.modules(), strict=True):
            if isinstance(ma, torch.nn.Linear):
                parts.append((ma.weight.double() - mb.weight.double()).detach().reshape(-1))
    return torch.cat(parts)


def assert_exact(features: DenseFeatures, dense: torch.Tensor, delta: torch.Tensor) -> None:
    """‖g‖² to 1e-5 relative and cos(g, Δ) to 1e-5 (float32 features against a float64 truth)."""
    sq = dense.square().sum(1)
    torch.testing.assert_close(features.sq_norms.double(), sq, rtol=1e-5, atol=1e-12)
    scale = (sq * delta.square().sum()).sqrt().clamp_min(1e-30)
    torch.testing.assert_close(
        features.target_dots.double() / scale, dense @ delta / scale, rtol=0, atol=1e-5
    )


def test_first_block(pair, cache) -> None:
    base, finetuned = pair
    assert first_block(base, finetuned, -1) == 1  # only the last of two blocks changed
    assert first_block(base, finetuned, 2) == 1  # never below the first changed block
    assert first_block(base, finetuned, 1) == 1
    with pytest.raises(W2DError, match="positive"):
        first_block(base, finetuned, 0)
    head_only = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-head")
    with torch.no_grad():
        head_only.model.lm_head.weight.add_(0.1)
    assert block_features(base, head_only, encode_classification(base.tokenizer, TEXTS, SEQ_LEN),
                          classification_loss(head_only, torch.zeros(len(TEXTS), dtype=torch.long)),
                          blocks=-1, progress=False) is None  # fmt: skip


def test_classification_exact_terms_and_sketch_match_autograd(pair) -> None:
    base, finetuned = pair
    encoded = encode_classification(
        finetuned.tokenizer, TEXTS, SEQ_LEN
    )  # left-padded: "Hi" is mostly padding
    labels = torch.tensor([i % 4 for i in range(len(TEXTS))])
    out = block_features(
        base, finetuned, encoded, classification_loss(finetuned, labels), blocks=-1, dim=64, seed=5,
        batch_size=3, progress=False,
    )  # fmt: skip
    rows = finetuned.model.lm_head.weight.detach().double()[TOKEN_IDS]

    def loss_of(_model, final, _row, index):
        return F.cross_entropy(final[:, -1] @ rows.T, labels[index], reduction="sum")

    dense = autograd_block_grads(finetuned, encoded, loss_of, out.start)
    delta = block_delta(base, finetuned, out.start)
    feats = out.features
    assert out.start == 1 and out.layers == 7  # q, k, v, o, gate, up, down
    assert_exact(feats, dense, delta)
    assert feats.delta_sq_norm == pytest.approx(float(delta.square().sum()), rel=1e-6)
    assert_sketched(feats, dense, layer_sketches(base, finetuned, out.start, 64, "rademacher", 5, "cpu"))


def per_layer(dense: torch.Tensor, layers: dict) -> Iterator[tuple[LayerSketch, torch.Tensor]]:
    """Each sketched layer with its slice of the (N, P) gradients, as (N, out, in)."""
    offset = 0
    for layer in layers.values():
        size = layer.delta.shape.numel()
        yield layer, dense[:, offset : offset + size].reshape(len(dense), *layer.delta.shape)
        offset += size


def assert_sketched(features: DenseFeatures, dense: torch.Tensor, layers: dict) -> None:
    """The sketch of each materialised layer gradient equals the factored sketch."""
    explicit = [
        torch.stack([layer.sketch.matrix(gi) for gi in g.float()]) for layer, g in per_layer(dense, layers)
    ]
    torch.testing.assert_close(features.grads, torch.cat(explicit, dim=1), rtol=1e-3, atol=1e-5)


def preconditioned(dense: torch.Tensor, layers: dict, pilot: torch.Tensor) -> torch.Tensor:
    """(N, P) D ∘ g per layer, D = α βᵀ fitted on the materialised gradients of the `pilot` rows."""
    out = []
    for _, g in per_layer(dense, layers):
        alpha, beta = factored_scales(g[pilot].square().sum(2).mean(0), g[pilot].square().sum(1).mean(0))
        out.append((g * alpha.double()[:, None] * beta.double()).reshape(len(dense), -1))
    return torch.cat(out, dim=1)


def test_preconditioned_terms_and_sketch_match_autograd(pair, tmp_path, monkeypatch) -> None:
    """Each layer's gradient rescaled by its Adafactor estimate, fitted on a pilot sample spread over
    chunks, is exact, sketched as the materialised D ∘ G is, and cached with its scales."""
    monkeypatch.setattr(features_module, "CHUNK_ROWS", 4)
    monkeypatch.setattr(block_gradients, "PILOT_ROWS", 6)
    base, finetuned = pair
    encoded = encode_classification(finetuned.tokenizer, TEXTS, SEQ_LEN)
    labels = torch.tensor([i % 4 for i in range(len(TEXTS))])

    def run(**kwargs) -> DenseFeatures:
        return block_features(
            base, finetuned, encoded, classification_loss(finetuned, labels), blocks=-1, dim=64, seed=5,
            batch_size=3, progress=False, **kwargs,
        ).features  # fmt: skip

    feats = run(precondition=True, cache_root=tmp_path, loss_key="test")
    rows = finetuned.model.lm_head.weight.detach().double()[TOKEN_IDS]

    def loss_of(_model, final, _row, index):
        return F.cross_entropy(final[:, -1] @ rows.T, labels[index], reduction="sum")

    layers = layer_sketches(base, finetuned, 1, 64, "rademacher", 5, "cpu")
    pilot = pilot_rows(len(TEXTS), 5)
    assert len(pilot) == 6 and pilot.diff().gt(0).all()
    dense = preconditioned(autograd_block_grads(finetuned, encoded, loss_of, 1), layers, pilot)
    assert_exact(feats, dense, block_delta(base, finetuned, 1))
    assert_sketched(feats, dense, layers)
    # read back with its scales; the raw gradients are another cache entry
    assert len(list((tmp_path / "blocks").glob("*/scales.safetensors"))) == 1
    again = run(precondition=True, cache_root=tmp_path, loss_key="test")
    torch.testing.assert_close(again.grads, feats.grads)
    # a new entry's pilot reads the block inputs the first run cached, and fits the same scales (to
    # float32 rounding: the pilot's sums run in another order)
    refit = run(precondition=True, cache_root=tmp_path, loss_key="new")
    torch.testing.assert_close(refit.grads, feats.grads, rtol=1e-5, atol=1e-5)
    raw = run(cache_root=tmp_path, loss_key="test")
    assert len(list((tmp_path / "blocks").iterdir())) == 3
    assert not torch.allclose(raw.target_dots, feats.target_dots)
    # a torchrun rank's slice (here all the rows, as if one rank of one) refits its scales each run,
    # for they depend on the other ranks' rows, and keys its chunks by their values, storing none
    sliced = run(precondition=True, cache_root=tmp_path, loss_key="test", corpus=CorpusSlice(0, len(TEXTS)))
    torch.testing.assert_close(sliced.grads, feats.grads, rtol=1e-5, atol=1e-5)  # refitted, as above
    entries = [read_json(meta) for meta in (tmp_path / "blocks").glob("*/meta.json")]
    assert len(entries) == 4 and sum("pilot_fit" in key for key in entries) == 1
    assert len(list((tmp_path / "blocks").glob("*/scales.safetensors"))) == 2  # "test" and "new"


def test_lm_exact_terms_match_autograd(pair) -> None:
    base, finetuned = pair
    encoded = encode_lm(finetuned.tokenizer, TEXTS, SEQ_LEN)  # right-padded; "Hi" scores nothing
    head = finetuned.model.lm_head

    def loss(final, batch, _index):
        return lm_loss_sum(head(final), batch, "full")[0]

    def loss_of(model, final, row, _index):
        return lm_loss_sum(model.lm_head(final), row, "full")[0]

    with torch.no_grad():  # a caller's no_grad does not stop the backward pass it needs
        out = block_features(base, finetuned, encoded, loss, blocks=1, batch_size=4, progress=False)
    dense = autograd_block_grads(finetuned, encoded, loss_of, out.start)
    delta = block_delta(base, finetuned, out.start)
    assert_exact(out.features, dense, delta)
    assert float(out.features.sq_norms[TEXTS.index("Hi")]) == 0.0


def test_sketched_block_inner_products_are_unbiased(pair) -> None:
    base, finetuned = pair
    encoded = encode_classification(finetuned.tokenizer, TEXTS, SEQ_LEN)
    labels = torch.tensor([i % 4 for i in range(len(TEXTS))])
    rows = finetuned.model.lm_head.weight.detach().double()[TOKEN_IDS]
    dense = autograd_block_grads(
        finetuned,
        encoded,
        lambda _m, f, _r, i: F.cross_entropy(f[:, -1] @ rows.T, labels[i], reduction="sum"),
        1,
    )
    truth = dense @ dense.T
    seeds = 40
    stack = torch.stack(
        [
            (lambda g: g @ g.T)(
                block_features(
                    base,
                    finetuned,
                    encoded,
                    classification_loss(finetuned, labels),
                    blocks=-1,
                    seed=s,
                    progress=False,
                ).features.grads.double()
            )
            for s in range(seeds)
        ]
    )  # (seeds, N, N)
    off = ~torch.eye(len(TEXTS), dtype=torch.bool)
    mean, stderr = stack.mean(0), stack.std(0) / seeds**0.5
    scale = truth.diagonal().sqrt()[:, None] * truth.diagonal().sqrt()[None, :]
    assert ((mean - truth).abs() <= 4 * stderr + 1e-6 * scale)[off].all()


def test_select_with_block_gradients(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b", "c", "d"], finetuned.tokenizer, "letters")
    data = DataConfig(seq_len=SEQ_LEN)
    head = corpus_gradients(
        base, finetuned, TEXTS, label_set, data, SelectConfig(k=4, strategy="greedy"), tmp_path
    )
    both = corpus_gradients(
        base, finetuned, TEXTS, label_set, data, SelectConfig(k=4, grad_blocks=2), tmp_path, base_losses=True
    )
    assert isinstance(both.features, SummedFeatures)
    assert both.timings["gradient_blocks"] == "1-1" and both.timings["block_layers"] == 7
    assert both.timings["precondition"] == "adam" and both.timings["block_precondition"] == "adafactor"
    assert torch.equal(both.labels, head.labels)
    block = both.features.parts[1]
    torch.testing.assert_close(both.features.target_dots, head.features.target_dots + block.target_dots)
    torch.testing.assert_close(both.features.dots_with(2), head.features.dots_with(2) + block.dots_with(2))
    for strategy in STRATEGIES:
        rec = recover(both, TEXTS, label_set, SelectConfig(k=4, grad_blocks=2), strategy, progress=False)
        assert len(set(rec.rows.tolist())) == 4
    # the summed objective is the objective of the concatenated gradients
    concat = DenseFeatures(
        torch.cat([_dense_head(head.features), block.grads], 1),
        torch.cat([head.features.delta.reshape(-1), block.delta]),
        target_dots=both.features.target_dots,
        sq_norms=both.features.sq_norms,
    )
    concat.delta_sq_norm = both.features.delta_sq_norm
    a, b = select("greedy", both.features, 5, progress=False), select("greedy", concat, 5, progress=False)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.objective == pytest.approx(b.objective, rel=1e-5)
    lm = lm_corpus_gradients(
        base, finetuned, TEXTS, SEQ_LEN, "full", SelectConfig(k=4, grad_blocks=-1), tmp_path
    )
    assert isinstance(lm.features, SummedFeatures) and lm.timings["gradient_blocks"] == "1-1"


def _dense_head(features) -> torch.Tensor:
    return torch.einsum("nc,nd->ncd", features.errors, features.hidden).reshape(len(features), -1)


def test_grad_blocks_config_errors() -> None:
    with pytest.raises(W2DError, match="path-combine concat"):
        SelectConfig(grad_blocks=2, grad_at="both")
    SelectConfig(grad_blocks=2, grad_at="both", path_combine="concat")
    SelectConfig(grad_blocks=2, grad_at="base")
    with pytest.raises(W2DError, match="grad_blocks"):
        SelectConfig(grad_blocks=-3)
    with pytest.raises(W2DError, match="block_sketch_dim"):
        SelectConfig(grad_blocks=1, block_sketch_dim=0)


def test_cli_select_with_grad_blocks(cli_env, capsys) -> None:
    import json

    from weights2data.cli import main

    finetune = ["finetune", "--model", "tiny-test", "--dataset", "ag_news_32", "--train-scope", "top:1",
                "--lr", "1e-2", "--results-dir", "runs", "--exp-name", "ft"]  # fmt: skip
    assert main(finetune) == 0
    select = ["select", "--base", "tiny-test", "--finetuned", "runs/ft/model", "--corpus", "wiki_passages_60",
              "-k", "8", "--results-dir", "runs"]  # fmt: skip
    assert main([*select, "--grad-blocks", "-1", "--exp-name", "sel"]) == 0
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert summary["gradient_blocks"] == "1-1" and summary["block_layers"] == 7
    assert summary["precondition"] == "adam" and summary["block_precondition"] == "adafactor"
    assert summary["strategy"] == "topk_balanced"  # --strategy auto with block gradients and four labels
    assert summary["config"]["grad_blocks"] == -1 and sum(summary["label_distribution"].values()) == 8
    assert main([*select, "--grad-blocks", "2", "--grad-at", "both", "--exp-name", "bad"]) == 2
    assert "--path-combine concat" in capsys.readouterr().err
    assert not (cli_env / "runs" / "bad").exists()
