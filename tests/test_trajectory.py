"""Pseudo-experts and preconditioning: gradients at points of the path, against autograd and brute force."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from test_recover import TEXTS, autograd_head_gradients
from weights2data.config import DataConfig, FinetuneConfig, SelectConfig
from weights2data.data import encode_classification, make_label_set
from weights2data.errors import W2DError
from weights2data.gradients import materialise
from weights2data.models import LoadedModel, tiny_test_model, untie_head
from weights2data.precondition import adam_scales, precondition
from weights2data.recover import check_lm_selection, corpus_gradients, recover
from weights2data.selection import DenseFeatures, FactoredFeatures, SummedFeatures, select
from weights2data.train import Task
from weights2data.trajectory import Walk, changed_scope, gradient_points, interpolate, segments


@pytest.fixture(scope="module")
def pair(cache) -> tuple[LoadedModel, LoadedModel]:
    """A tied base and a finetune that untied and moved the head and moved every block."""
    base = tiny_test_model(cache, seed=0)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-finetuned")
    untie_head(finetuned.model)
    with torch.no_grad():
        for p in finetuned.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, finetuned


@pytest.fixture(scope="module")
def label_set(pair):
    return make_label_set(["a", "b", "c", "d"], pair[1].tokenizer, "letters")


def test_interpolation_is_linear_in_every_weight(pair) -> None:
    base, finetuned = pair
    mid = interpolate(base, finetuned, 0.25)
    for name, p in mid.model.named_parameters():
        p0 = dict(base.model.named_parameters()).get(name, base.model.get_input_embeddings().weight)
        p1 = dict(finetuned.model.named_parameters())[name]
        torch.testing.assert_close(p, p0 + 0.25 * (p1 - p0))
    points = list(segments(base, finetuned, 3, "linear"))
    assert points[0][0] is base and points[-1][1] is finetuned and points[1][0] is points[0][1]
    assert gradient_points(*points[0], "both") == list(points[0])
    with pytest.raises(W2DError):
        list(segments(base, finetuned, 0, "linear"))


def test_one_pseudo_expert_is_the_original_selection(pair, label_set, tmp_path) -> None:
    base, finetuned = pair
    data = DataConfig(seq_len=16)
    old = corpus_gradients(base, finetuned, TEXTS, label_set, data, SelectConfig(k=6), tmp_path)
    new = corpus_gradients(
        base,
        finetuned,
        TEXTS,
        label_set,
        data,
        SelectConfig(k=6, pseudo_experts=1, path_combine="concat"),
        tmp_path,
    )
    assert isinstance(old.features, FactoredFeatures) and isinstance(new.features, FactoredFeatures)
    for strategy in ("greedy", "topk"):
        a, b = (recover(g, TEXTS, label_set, SelectConfig(k=6), strategy, progress=False) for g in (old, new))
        assert a.rows.tolist() == b.rows.tolist()


def test_pseudo_expert_gradients_match_autograd(pair, label_set, tmp_path) -> None:
    """P = 2, gradients at both ends of each segment, concatenated: every part equals autograd's."""
    base, finetuned = pair
    data = DataConfig(seq_len=16)
    cfg = SelectConfig(k=6, pseudo_experts=2, grad_at="both", path_combine="concat", precondition="none")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, data, cfg, tmp_path)
    assert isinstance(grads.features, SummedFeatures) and len(grads.features.parts) == 4
    mid = interpolate(base, finetuned, 0.5)
    head = lambda m: m.model.get_output_embeddings().weight.detach()  # noqa: E731
    expected = [(base, base, mid), (mid, base, mid), (mid, mid, finetuned), (finetuned, mid, finetuned)]
    for part, (at, start, end) in zip(grads.features.parts, expected, strict=True):
        dense = autograd_head_gradients(at.model, TEXTS, at.tokenizer, label_set.token_ids, grads.labels, 16)
        exact = DenseFeatures(dense, (head(start) - head(end)).reshape(-1))
        torch.testing.assert_close(part.target_dots, exact.target_dots, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(part.sq_norms, exact.sq_norms, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(part.dots_with(2), exact.dots_with(2), atol=1e-6, rtol=1e-4)


def test_sum_of_both_ends_is_the_summed_gradient(pair, label_set, tmp_path) -> None:
    base, finetuned = pair
    cfg = SelectConfig(k=6, grad_at="both", path_combine="sum", precondition="none")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), cfg, tmp_path)
    dense = sum(
        autograd_head_gradients(m.model, TEXTS, m.tokenizer, label_set.token_ids, grads.labels, 16)
        for m in (base, finetuned)
    )
    head = lambda m: m.model.get_output_embeddings().weight.detach()  # noqa: E731
    exact = DenseFeatures(dense, (head(base) - head(finetuned)).reshape(-1))
    torch.testing.assert_close(grads.features.target_dots, exact.target_dots, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads.features.dots_with(5), exact.dots_with(5), atol=1e-6, rtol=1e-4)
    assert select("greedy", grads.features, 6, progress=False).indices.tolist() == (
        select("greedy", exact, 6, progress=False).indices.tolist()
    )


def test_distill_walk_moves_towards_the_finetuned_model(pair, label_set, tmp_path) -> None:
    """The walk's snapshots get closer to θ1's predictions and weights; the path ends at θ1 itself."""
    base, finetuned = pair
    task = Task("classification", 16, label_set)
    probs = torch.softmax(torch.randn(len(TEXTS), 4, generator=torch.Generator().manual_seed(0)) * 3, -1)
    walk = Walk(TEXTS, task, probs, FinetuneConfig(train_scope="full", lr=3e-3, steps=30, batch_size=4), 0.0)
    points = [end for _, end in segments(base, finetuned, 3, "distill", walk)]
    assert len(points) == 3 and points[-1] is finetuned
    assert changed_scope(base, finetuned) == "full"
    encoded = encode_classification(base.tokenizer, TEXTS, 16)

    def kl(model: LoadedModel) -> float:
        logits = model.model(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            position_ids=encoded.position_ids,
        ).logits[:, -1, label_set.token_ids]
        return float(F.kl_div(F.log_softmax(logits, -1), probs, reduction="batchmean"))

    with torch.no_grad():
        assert kl(points[1]) < kl(points[0]) < kl(base)
    with pytest.raises(W2DError, match="classification"):
        list(segments(base, finetuned, 2, "distill"))


def test_adam_preconditioning_is_the_rank_one_second_moment() -> None:
    gen = torch.Generator().manual_seed(3)
    errors, hidden, delta = (
        torch.randn(40, 3, generator=gen),
        torch.randn(40, 7, generator=gen),
        torch.randn(3, 7),
    )
    grads = materialise(errors, hidden).reshape(40, 3, 7).double()
    v = grads.square().mean(0)  # (C, d) the full second moment
    v_hat = torch.outer(v.sum(1), v.sum(0)) / v.sum()  # Adafactor's rank-one estimate
    alpha, beta = adam_scales(errors, hidden)
    torch.testing.assert_close(torch.outer(alpha, beta).double(), v_hat.rsqrt(), rtol=1e-4, atol=0)
    e, h = precondition(errors, hidden, "adam")
    dense = (grads * v_hat.rsqrt()).reshape(40, -1).float()
    ours, exact = FactoredFeatures(e, h, delta), DenseFeatures(dense, delta.reshape(-1))
    torch.testing.assert_close(ours.target_dots, exact.target_dots, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.dots_with(1), exact.dots_with(1), rtol=1e-4, atol=1e-4)
    assert precondition(errors, hidden, "none") == (errors, hidden)


def test_auto_preconditioning_is_adam_for_label_token_head_gradients_and_none_elsewhere(
    pair, label_set, tmp_path
) -> None:
    base, finetuned = pair
    data = DataConfig(seq_len=16)
    auto, adam, none = (
        corpus_gradients(base, finetuned, TEXTS, label_set, data, SelectConfig(k=6, **kind), tmp_path)
        for kind in ({"strategy": "greedy"}, {"precondition": "adam"}, {"precondition": "none"})
    )
    assert SelectConfig().precondition == "auto"
    assert (auto.timings["precondition"], adam.timings["precondition"], none.timings["precondition"]) == (
        "adam",
        "adam",
        "none",
    )
    torch.testing.assert_close(auto.features.target_dots, adam.features.target_dots)
    assert not torch.allclose(auto.features.target_dots, none.features.target_dots)
    full = corpus_gradients(
        base,
        finetuned,
        TEXTS,
        label_set,
        DataConfig(seq_len=16, label_loss="full"),
        SelectConfig(k=6),
        tmp_path,
    )
    assert full.timings["precondition"] == "none"  # no factored estimate of a V × d gradient
    with pytest.raises(W2DError, match="language-modelling selection has none"):
        check_lm_selection(SelectConfig(precondition="adam"), ["greedy"])
    check_lm_selection(SelectConfig(), ["greedy"])


def test_kfac_whitening_is_the_kronecker_inverse_square_root() -> None:
    gen = torch.Generator().manual_seed(4)
    errors, hidden, delta = (
        torch.randn(60, 3, generator=gen),
        torch.randn(60, 5, generator=gen),
        torch.randn(3, 5),
    )
    a, b = errors.double().T @ errors.double() / 60, hidden.double().T @ hidden.double() / 60
    e, h = precondition(errors, hidden, "kfac")
    ours = FactoredFeatures(e, h, delta)
    grads = materialise(errors, hidden).double()
    gram = grads @ torch.linalg.inv(torch.kron(a, b)) @ grads.T  # ⟨g_i, g_j⟩ in the whitened metric
    torch.testing.assert_close(ours.dots_with(2).double(), gram[:, 2], rtol=1e-3, atol=1e-3)


def test_path_options_are_validated() -> None:
    for bad in (
        {"pseudo_experts": 0},
        {"path": "zigzag"},
        {"path_combine": "mean"},
        {"precondition": "shampoo"},
        {"label_prior": "lots"},
        {"k": "100"},
        {"pseudo_experts": 2, "grad_blocks": 2},  # sum joins head gradients only
    ):
        with pytest.raises(W2DError):
            SelectConfig(**bad)
    SelectConfig(pseudo_experts=2, grad_blocks=2, path_combine="concat", label_prior="2,1,1")
