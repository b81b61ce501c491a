import math

import numpy as np
import pytest
import torch

from weights2data.errors import W2DError
from weights2data.reference import original_greedy
from weights2data.selection import (
    STRATEGIES,
    DenseFeatures,
    FactoredFeatures,
    LowRankFeatures,
    greedy,
    label_quotas,
    objective,
    select,
    unit_weights,
)


def _dense(n: int = 40, d: int = 8, seed: int = 0, common: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gradients with a shared component along Δ, so the selection is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(d, generator=gen)
    weights = common * torch.randn(n, 1, generator=gen) + 0.2
    grads = torch.randn(n, d, generator=gen) + weights * delta / delta.norm() * math.sqrt(d)
    return grads, delta


def _cos(grads: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return grads @ delta / (np.linalg.norm(grads, axis=1) * np.linalg.norm(delta))


def _brute_greedy(grads: np.ndarray, delta: np.ndarray, k: int, reset: int | None = None) -> list[int]:
    """Exhaustive float64 recomputation of cos(R + g_i, Δ) at every step."""
    picks: list[int] = []
    running = np.zeros(grads.shape[1])
    for step in range(k):
        if reset and step % reset == 0:
            running = np.zeros(grads.shape[1])
        cos = _cos(running + grads, delta)
        cos[picks] = -np.inf
        picks.append(int(np.argmax(cos)))
        running += grads[picks[-1]]
    return picks


def test_factored_matches_materialised_dense():
    gen = torch.Generator().manual_seed(1)
    n, c, d = 50, 4, 12
    errors, hidden, delta = (
        torch.randn(n, c, generator=gen),
        torch.randn(n, d, generator=gen),
        torch.randn(c, d, generator=gen),
    )
    grads = torch.einsum("nc,nd->ncd", errors, hidden).reshape(n, c * d)
    fac, dense = FactoredFeatures(errors, hidden, delta), DenseFeatures(grads, delta.reshape(-1))
    torch.testing.assert_close(fac.target_dots, dense.target_dots, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fac.sq_norms, dense.sq_norms, rtol=1e-5, atol=1e-5)
    for j in (0, 7, 49):
        torch.testing.assert_close(fac.dots_with(j), dense.dots_with(j), rtol=1e-5, atol=1e-4)
    picks = torch.tensor([3, 9, 11])
    torch.testing.assert_close(fac.dots_with_sum(picks), dense.dots_with_sum(picks), rtol=1e-5, atol=1e-4)
    assert fac.delta_sq_norm == pytest.approx(dense.delta_sq_norm, rel=1e-6)
    a = select("greedy", fac, 20, progress=False)
    b = select("greedy", dense, 20, progress=False)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.objective == pytest.approx(b.objective, abs=1e-6)


def test_greedy_matches_brute_force_and_original():
    grads, delta = _dense()
    g, dl = grads.double().numpy(), delta.double().numpy()
    sel = select("greedy", DenseFeatures(grads, delta), 25, progress=False)
    assert sel.indices.tolist() == _brute_greedy(g, dl, 25)
    assert sel.indices.tolist() == original_greedy(g, dl, 25).tolist()
    assert len(set(sel.indices.tolist())) == 25
    running = np.cumsum(g[sel.indices.numpy()], axis=0)
    np.testing.assert_allclose(sel.scores.numpy(), _cos(running, dl), rtol=1e-5)


def test_greedy_batched_resets_running_sum():
    grads, delta = _dense(seed=2)
    g, dl = grads.double().numpy(), delta.double().numpy()
    sel = select("greedy_batched", DenseFeatures(grads, delta), 30, batch_size=7, progress=False)
    assert sel.indices.tolist() == _brute_greedy(g, dl, 30, reset=7)
    assert len(set(sel.indices.tolist())) == 30


@pytest.mark.parametrize("strategy, descending", [("topk", True), ("bottomk", False)])
def test_topk_bottomk(strategy, descending):
    grads, delta = _dense(seed=3)
    cos = _cos(grads.double().numpy(), delta.double().numpy())
    expected = np.argsort(-cos if descending else cos, kind="stable")[:10]
    sel = select(strategy, DenseFeatures(grads, delta), 10, progress=False)
    assert sel.indices.tolist() == expected.tolist()
    np.testing.assert_allclose(sel.scores.numpy(), cos[expected], rtol=1e-5)


def test_topk_balanced_quotas_and_fill():
    grads, delta = _dense(n=40, seed=4)
    features = DenseFeatures(grads, delta)
    cos = _cos(grads.double().numpy(), delta.double().numpy())
    labels = torch.arange(40) % 4
    sel = select("topk_balanced", features, 12, labels=labels, progress=False)
    counts = np.bincount(labels[sel.indices].numpy(), minlength=4)
    assert counts.tolist() == [3, 3, 3, 3]
    for c in range(4):  # within each label, the best three cosines
        members = np.flatnonzero(labels.numpy() == c)
        best = members[np.argsort(-cos[members])[:3]]
        assert set(best) == {i for i in sel.indices.tolist() if labels[i] == c}
    # one label has only two documents: its quota cannot be met and the rest is filled
    skewed = torch.tensor([0, 0] + [1] * 38)
    sel = select("topk_balanced", features, 10, labels=skewed, progress=False)
    assert len(set(sel.indices.tolist())) == 10
    assert sorted(skewed[sel.indices].tolist()) == [0, 0] + [1] * 8


@pytest.mark.parametrize("strategy", ["p_min", "p_max"])
def test_loss_strategies(strategy):
    losses = torch.rand(40, generator=torch.Generator().manual_seed(5))
    sel = select(strategy, None, 8, losses=losses, progress=False)
    order = np.argsort(losses.numpy() if strategy == "p_min" else -losses.numpy(), kind="stable")
    assert sel.indices.tolist() == order[:8].tolist()
    assert math.isnan(sel.objective)


def test_loss_drop_ranks_by_how_much_the_finetune_raised_each_autolabel():
    gen = torch.Generator().manual_seed(6)
    losses, base_losses = torch.rand(40, generator=gen), 3 * torch.rand(40, generator=gen)
    base_losses[4] = math.nan  # a document without a scored token ranks last
    drop = (base_losses - losses).nan_to_num(-math.inf).numpy()
    sel = select("loss_drop", None, 8, losses=losses, base_losses=base_losses, progress=False)
    assert sel.indices.tolist() == np.argsort(-drop, kind="stable")[:8].tolist()
    assert math.isnan(sel.objective)
    labels = (torch.arange(40) % 4 == 0).long()  # 10 of label 1, 30 of label 0
    sel = select("loss_drop_balanced", None, 8, labels=labels, losses=losses, base_losses=base_losses)
    assert sorted(labels[sel.indices].tolist()) == [0] * 4 + [1] * 4
    for c in (0, 1):  # within a label, the largest drops
        rows = np.nonzero(labels.numpy() == c)[0]
        best = rows[np.argsort(-drop[rows], kind="stable")[:4]]
        assert sorted(sel.indices[labels[sel.indices] == c].tolist()) == sorted(best.tolist())


def test_random_is_seeded_and_without_repeats():
    grads, delta = _dense()
    features = DenseFeatures(grads, delta)
    a, b = (select("random", features, 15, seed=7) for _ in range(2))
    assert a.indices.tolist() == b.indices.tolist()
    assert len(set(a.indices.tolist())) == 15
    assert select("random", features, 15, seed=8).indices.tolist() != a.indices.tolist()


@pytest.mark.parametrize("strategy", ["greedy", "topk", "random"])
def test_objective_is_cosine_of_the_sum(strategy):
    grads, delta = _dense(seed=6)
    sel = select(strategy, DenseFeatures(grads, delta), 12, progress=False)
    total = grads.double()[sel.indices].sum(0).numpy()
    assert sel.objective == pytest.approx(float(_cos(total[None], delta.double().numpy())[0]), abs=1e-6)


def test_exact_overrides_and_greedy_on_structured_data():
    """Larger correlated data: float32 engine vs float64 reference until the first near-tie."""
    grads, delta = _dense(n=2000, d=64, seed=9, common=0.3)
    features = DenseFeatures(grads, delta, target_dots=grads @ delta, sq_norms=grads.square().sum(1))
    picks, scores, stats = greedy(features, 300, progress=False)
    assert stats == {"engine": "float32 step"}
    ref = original_greedy(grads.double().numpy(), delta.double().numpy(), 300)
    agree = int(np.argmax(np.append(picks.numpy() != ref, True)))
    assert agree > 50
    if agree < 300:  # parted at a near-tie
        running = grads.double()[picks[:agree]].sum(0).numpy()
        cos = _cos(running + grads.double().numpy(), delta.double().numpy())
        assert abs(cos[picks[agree]] - cos[ref[agree]]) < 1e-5
    assert objective(features, picks) == pytest.approx(objective(features, torch.from_numpy(ref)), abs=1e-3)


def test_errors():
    grads, delta = _dense()
    features = DenseFeatures(grads, delta)
    for call in (
        lambda: select("nope", features, 5),
        lambda: select("greedy", features, 41),
        lambda: select("topk", features, 0),
        lambda: select("topk_balanced", features, 5),
        lambda: select("p_min", features, 5),
        lambda: select("greedy", None, 5),
        lambda: select("p_max", features, 5, losses=torch.rand(39)),
        lambda: select("loss_drop", None, 5, losses=torch.rand(40)),
        lambda: select("loss_drop", None, 5, losses=torch.rand(40), base_losses=torch.rand(39)),
        lambda: DenseFeatures(grads, delta[:3]),
        lambda: FactoredFeatures(torch.randn(4, 2), torch.randn(5, 3), torch.randn(2, 3)),
    ):
        with pytest.raises(W2DError):
            call()
    assert set(STRATEGIES) == {
        "greedy",
        "greedy_balanced",
        "greedy_batched",
        "topk",
        "topk_balanced",
        "bottomk",
        "p_min",
        "p_max",
        "loss_drop",
        "loss_drop_balanced",
        "random",
    }


def test_low_rank_features_match_the_materialised_sum():
    gen = torch.Generator().manual_seed(2)
    n, p, c, d = 30, 3, 4, 10
    errors, hidden, delta = (torch.randn(*s, generator=gen) for s in ((n, p, c), (n, p, d), (c, d)))
    grads = torch.einsum("npc,npd->ncd", errors, hidden).reshape(n, c * d)
    low, dense = LowRankFeatures(errors, hidden, delta), DenseFeatures(grads, delta.reshape(-1))
    torch.testing.assert_close(low.target_dots, dense.target_dots, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(low.sq_norms, dense.sq_norms, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(low.dots_with(4), dense.dots_with(4), rtol=1e-5, atol=1e-3)
    picks, rows = torch.tensor([1, 5, 8]), torch.tensor([0, 2])
    torch.testing.assert_close(
        low.dots_with_sum(picks, rows), dense.dots_with_sum(picks, rows), atol=1e-3, rtol=1e-5
    )
    assert select("greedy", low, 8, progress=False).indices.tolist() == _brute_greedy(
        grads.double().numpy(), delta.reshape(-1).double().numpy(), 8
    )


def test_greedy_balanced_is_greedy_within_label_quotas():
    grads, delta = _dense(n=60, seed=6)
    labels = torch.arange(60) % 3
    sel = select("greedy_balanced", DenseFeatures(grads, delta), 9, labels=labels, progress=False)
    assert np.bincount(labels[sel.indices].numpy(), minlength=3).tolist() == [3, 3, 3]
    # the same picks as brute-force greedy that skips labels whose quota is full
    picks, running = [], np.zeros(grads.shape[1])
    g, dl = grads.double().numpy(), delta.double().numpy()
    for _ in range(9):
        cos = _cos(running + g, dl)
        full = [c for c in range(3) if sum(labels[i] == c for i in picks) == 3]
        cos[picks] = -np.inf
        cos[np.isin(labels.numpy(), full)] = -np.inf
        picks.append(int(np.argmax(cos)))
        running += g[picks[-1]]
    assert sel.indices.tolist() == picks
    # a prior: twice as many of label 0
    sel = select(
        "greedy_balanced", DenseFeatures(grads, delta), 8, labels=labels,
        label_prior=torch.tensor([2.0, 1.0, 1.0]), progress=False,
    )  # fmt: skip
    assert np.bincount(labels[sel.indices].numpy(), minlength=3).tolist() == [4, 2, 2]


def test_label_quotas_use_the_label_set_size_and_fill_shortfalls():
    labels = torch.tensor([0] * 10 + [1] * 10)  # label 2 of a 3-label set has no candidate
    assert label_quotas(labels, 6, num_labels=3).tolist() == [3, 3, 0]
    assert label_quotas(labels, 6, num_labels=None).tolist() == [3, 3]
    assert label_quotas(labels, 12, num_labels=4, prior=torch.tensor([1.0, 0, 0, 0])).tolist() == [
        10,
        2,
        0,
        0,
    ]
    with pytest.raises(W2DError):
        label_quotas(labels, 6, num_labels=1)


def test_a_zero_weight_change_is_a_clear_error():
    grads, _ = _dense()
    features = DenseFeatures(grads, torch.zeros(grads.shape[1]))
    for strategy in ("greedy", "topk"):
        with pytest.raises(W2DError, match="weight change is zero"):
            select(strategy, features, 5, progress=False)
    assert len(select("random", features, 5, progress=False).indices) == 5


@pytest.mark.parametrize("strategy", ["greedy", "greedy_balanced", "topk", "p_min", "random"])
def test_excluded_rows_are_never_picked_and_the_rest_is_as_without_them(strategy):
    grads, delta = _dense(n=50, seed=8)
    labels, losses = torch.arange(50) % 3, torch.rand(50, generator=torch.Generator().manual_seed(1))
    exclude = torch.tensor([0, 5, 7, 30])
    keep = torch.tensor([i for i in range(50) if i not in exclude.tolist()])
    options = dict(labels=labels, losses=losses, progress=False)
    sel = select(strategy, DenseFeatures(grads, delta), 9, exclude=exclude, **options)
    alone = select(
        strategy,
        DenseFeatures(grads[keep], delta),
        9,
        **{**options, "labels": labels[keep], "losses": losses[keep]},
    )
    assert sel.indices.tolist() == keep[alone.indices].tolist()
    assert not set(sel.indices.tolist()) & set(exclude.tolist())
    if strategy != "random" and strategy != "p_min":
        assert sel.objective == pytest.approx(alone.objective, abs=1e-6)


@pytest.mark.parametrize("strategy", ["greedy", "greedy_batched", "greedy_balanced"])
def test_unit_weights_make_greedy_pick_as_over_unit_length_gradients(strategy):
    gen = torch.Generator().manual_seed(4)
    n, c, d = 60, 3, 10
    errors = torch.randn(n, c, generator=gen) * torch.rand(n, 1, generator=gen) * 5  # norms spread wide
    errors[17] = 0  # a zero gradient: weight 0, never NaN
    hidden, delta = torch.randn(n, d, generator=gen) + 0.3, torch.randn(c, d, generator=gen)
    factored = FactoredFeatures(errors, hidden, delta)
    grads = torch.einsum("nc,nd->ncd", errors, hidden).reshape(n, c * d)
    norms = grads.norm(dim=1, keepdim=True)
    unit = DenseFeatures(torch.where(norms > 0, grads / norms, grads), delta.reshape(-1))
    weights = unit_weights(factored)
    assert weights[17] == 0 and torch.isfinite(weights).all()
    labels = torch.arange(n) % c
    kw = dict(batch_size=6, labels=labels, progress=False)
    weighted = select(strategy, factored, 20, weights=weights, **kw)
    assert weighted.indices.tolist() == select(strategy, unit, 20, **kw).indices.tolist()
    assert weighted.indices.tolist() != select(strategy, factored, 20, **kw).indices.tolist()
    assert weighted.objective == pytest.approx(objective(factored, weighted.indices), abs=1e-7)  # the raw one
    exclude = torch.tensor([0, 5, 9])
    kept = select(strategy, factored, 20, weights=weights, exclude=exclude, **kw)
    assert kept.indices.tolist() == select(strategy, unit, 20, exclude=exclude, **kw).indices.tolist()
    with pytest.raises(W2DError, match="weights must be one per document"):
        select(strategy, factored, 5, weights=weights[:-1], **kw)
