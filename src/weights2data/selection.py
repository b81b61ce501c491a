"""Choose k corpus documents whose LM-head gradients best explain the finetuning update.

g_i is document i's loss gradient w.r.t. the head at the finetuned weights, and
Δ = W_head(base) − W_head(finetuned). Gradients enter only through inner products, so a
feature object supplies ⟨g_i, Δ⟩, ‖g_i‖², and ⟨g_i, ·⟩ against one or a sum of gradients;
classification gradients stay factored as e_i h_iᵀ and are never materialised.

The greedy engine (SELECT) adds, at each step, the unchosen i maximising cos(R + g_i, Δ),
where R is the sum of the gradients chosen so far. It is incremental (DESIGN §3): one Gram
row ⟨g_i, g_j⟩ per pick, float32 on the N-sized vectors, float64 only for two scalars.
`dots_with_sum` exists for the final objective, cos(Σ_chosen g, Δ), which k separate Gram
rows would make as expensive as the selection itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.errors import W2DError
from weights2data.screening import screened_greedy, use_screen

STRATEGIES = (
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
)
AUTO = "auto"  # a setting, made one of STRATEGIES where the label count is known (recover.resolve_strategy)
STRATEGY_SETTINGS = (AUTO, *STRATEGIES)  # what --strategy accepts
BALANCED = ("greedy_balanced", "topk_balanced", "loss_drop_balanced")  # per-label quotas
GREEDY = ("greedy", "greedy_batched", "greedy_balanced")
LOSS_DROP = ("loss_drop", "loss_drop_balanced")  # rank by the autolabel's loss, base minus finetuned
WITHOUT_GRADIENTS = ("p_min", "p_max", *LOSS_DROP, "random")  # the strategies that need no features

_TINY = 1e-30  # floor under squared norms before a square root


class GradientFeatures(Protocol):
    target_dots: Tensor  # (N,) ⟨g_i, Δ⟩
    sq_norms: Tensor  # (N,) ‖g_i‖²
    delta_sq_norm: float  # ‖Δ‖²

    def dots_with(self, j: int) -> Tensor:
        """(N,) ⟨g_i, g_j⟩ for all i."""
        ...

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        """⟨g_i, Σ_{j ∈ picks} g_j⟩ for i in `rows` (all N when None)."""
        ...

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        """What the gradients of `rows` are made of, each tensor (len(rows), ...): what a rank
        sends so that others can take inner products with gradients they do not hold."""
        ...

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        """(N,) ⟨g_i, g⟩ for the one gradient g whose `row_factors` these are; dots_with(j) is
        exactly this for row j's factors, so a rank that received them gets the same numbers."""
        ...

    def with_rows(self, factors: list[Tensor]) -> GradientFeatures:
        """A feature object of the same kind holding the rows these `row_factors` describe."""
        ...

    def __len__(self) -> int: ...


@dataclass
class FactoredFeatures:
    """Classification head gradients g_i = e_i h_iᵀ (C × d), kept as their two factors."""

    errors: Tensor  # (N, C) softmax error over the label tokens
    hidden: Tensor  # (N, d) final hidden state
    delta: Tensor  # (C, d) Δ restricted to the label rows
    target_dots: Tensor = field(init=False)
    sq_norms: Tensor = field(init=False)
    delta_sq_norm: float = field(init=False)

    def __post_init__(self) -> None:
        self.errors, self.hidden, self.delta = (x.float() for x in (self.errors, self.hidden, self.delta))
        n, c = _shape2(self.errors, "errors")
        if self.hidden.dim() != 2 or self.hidden.shape[0] != n:
            raise W2DError(f"hidden must be (N={n}, d), got {tuple(self.hidden.shape)}")
        if tuple(self.delta.shape) != (c, self.hidden.shape[1]):
            raise W2DError(f"delta must be (C={c}, d={self.hidden.shape[1]}), got {tuple(self.delta.shape)}")
        self.target_dots = ((self.hidden @ self.delta.T) * self.errors).sum(1)  # e_iᵀ Δ h_i
        self.sq_norms = self.errors.square().sum(1) * self.hidden.square().sum(1)
        self.delta_sq_norm = float(self.delta.double().square().sum())

    def __len__(self) -> int:
        return self.errors.shape[0]

    def dots_with(self, j: int) -> Tensor:
        return self.dots_with_factors(self.row_factors(torch.tensor([j])))

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        total = self.errors[picks].T @ self.hidden[picks]  # (C, d) Σ_j e_j h_jᵀ
        e, h = (self.errors, self.hidden) if rows is None else (self.errors[rows], self.hidden[rows])
        return ((h @ total.T) * e).sum(1)

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        return [self.errors[rows], self.hidden[rows]]

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        e, h = factors  # (1, C), (1, d)
        return (self.errors @ e[0]) * (self.hidden @ h[0])

    def with_rows(self, factors: list[Tensor]) -> FactoredFeatures:
        return FactoredFeatures(*factors, self.delta)

    def to(self, device: torch.device | str) -> FactoredFeatures:
        return FactoredFeatures(self.errors.to(device), self.hidden.to(device), self.delta.to(device))


@dataclass
class LowRankFeatures:
    """Sums of P factored gradients per document, g_i = Σ_p e_ip h_ipᵀ (C × d), kept as factors.

    The gradient summed over several weights (pseudo-experts, or base and finetuned) against
    one target: every inner product is exact, ⟨g_i, g_j⟩ = Σ_{p,q} (e_ip·e_jq)(h_ip·h_jq).
    """

    errors: Tensor  # (N, P, C)
    hidden: Tensor  # (N, P, d)
    delta: Tensor  # (C, d)
    target_dots: Tensor = field(init=False)
    sq_norms: Tensor = field(init=False)
    delta_sq_norm: float = field(init=False)

    def __post_init__(self) -> None:
        self.errors, self.hidden, self.delta = (x.float() for x in (self.errors, self.hidden, self.delta))
        if self.errors.dim() != 3 or self.hidden.dim() != 3 or self.errors.shape[:2] != self.hidden.shape[:2]:
            raise W2DError(
                f"errors (N, P, C) and hidden (N, P, d) must agree, got {tuple(self.errors.shape)} "
                f"and {tuple(self.hidden.shape)}"
            )
        if tuple(self.delta.shape) != (self.errors.shape[2], self.hidden.shape[2]):
            raise W2DError(f"delta must be (C, d), got {tuple(self.delta.shape)}")
        self.target_dots = torch.einsum("npd,cd,npc->n", self.hidden, self.delta, self.errors)
        gram = torch.einsum("npc,nqc->npq", self.errors, self.errors)  # (N, P, P)
        self.sq_norms = (gram * torch.einsum("npd,nqd->npq", self.hidden, self.hidden)).sum((1, 2))
        self.delta_sq_norm = float(self.delta.double().square().sum())

    def __len__(self) -> int:
        return self.errors.shape[0]

    def dots_with(self, j: int) -> Tensor:
        return self.dots_with_factors(self.row_factors(torch.tensor([j])))

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        total = torch.einsum("npc,npd->cd", self.errors[picks], self.hidden[picks])  # (C, d)
        e, h = (self.errors, self.hidden) if rows is None else (self.errors[rows], self.hidden[rows])
        return torch.einsum("npd,cd,npc->n", h, total, e)

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        return [self.errors[rows], self.hidden[rows]]

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        e, h = factors  # (1, P, C), (1, P, d)
        products = torch.einsum("npc,qc->npq", self.errors, e[0])
        return (products * torch.einsum("npd,qd->npq", self.hidden, h[0])).sum((1, 2))

    def with_rows(self, factors: list[Tensor]) -> LowRankFeatures:
        return LowRankFeatures(*factors, self.delta)

    def to(self, device: torch.device | str) -> LowRankFeatures:
        return LowRankFeatures(self.errors.to(device), self.hidden.to(device), self.delta.to(device))


@dataclass
class DenseFeatures:
    """Explicit gradient vectors (projected or sketched), one row per document.

    `target_dots` / `sq_norms` may be given exactly (the LM path computes them without
    sketching); otherwise they come from `grads` and `delta`.
    """

    grads: Tensor  # (N, D)
    delta: Tensor  # (D,)
    target_dots: Tensor | None = None  # (N,)
    sq_norms: Tensor | None = None  # (N,)
    delta_sq_norm: float = field(init=False)

    def __post_init__(self) -> None:
        self.grads, self.delta = self.grads.float(), self.delta.float()
        n, d = _shape2(self.grads, "grads")
        if tuple(self.delta.shape) != (d,):
            raise W2DError(f"delta must be (D={d},), got {tuple(self.delta.shape)}")
        self.target_dots = self.grads @ self.delta if self.target_dots is None else self.target_dots.float()
        self.sq_norms = self.grads.square().sum(1) if self.sq_norms is None else self.sq_norms.float()
        for name, v in (("target_dots", self.target_dots), ("sq_norms", self.sq_norms)):
            if tuple(v.shape) != (n,):
                raise W2DError(f"{name} must be (N={n},), got {tuple(v.shape)}")
        self.delta_sq_norm = float(self.delta.double().square().sum())

    def __len__(self) -> int:
        return self.grads.shape[0]

    def dots_with(self, j: int) -> Tensor:
        return self.dots_with_factors(self.row_factors(torch.tensor([j])))

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        total = self.grads[picks].sum(0)  # (D,)
        return (self.grads if rows is None else self.grads[rows]) @ total

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        # the exact ⟨g, Δ⟩ and ‖g‖² travel with a sketched row: they are not functions of it
        return [self.grads[rows], self.target_dots[rows], self.sq_norms[rows]]

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        return self.grads @ factors[0][0]

    def with_rows(self, factors: list[Tensor]) -> DenseFeatures:
        return DenseFeatures(factors[0], self.delta, factors[1], factors[2])

    def to(self, device: torch.device | str) -> DenseFeatures:
        move = (self.grads, self.delta, self.target_dots, self.sq_norms)
        return DenseFeatures(*(x.to(device) for x in move))


class SummedFeatures:
    """Gradients over several parameter groups (e.g. the head and the top blocks), one group each.

    A document's gradient is the concatenation of its parts, so every inner product, squared
    norm and ‖Δ‖² is the sum of the parts'.
    """

    def __init__(self, parts: list) -> None:
        if len({len(p) for p in parts}) != 1:
            raise W2DError(f"feature parts disagree on the number of documents: {[len(p) for p in parts]}")
        self.parts = parts
        self.target_dots = sum(p.target_dots for p in parts)  # (N,)
        self.sq_norms = sum(p.sq_norms for p in parts)  # (N,)
        self.delta_sq_norm = sum(p.delta_sq_norm for p in parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    def dots_with(self, j: int) -> Tensor:
        return sum(p.dots_with(j) for p in self.parts)

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        return sum(p.dots_with_sum(picks, rows) for p in self.parts)

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        return [f for p in self.parts for f in p.row_factors(rows)]

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        return sum(p.dots_with_factors(f) for p, f in zip(self.parts, self._split(factors), strict=True))

    def with_rows(self, factors: list[Tensor]) -> SummedFeatures:
        return SummedFeatures([p.with_rows(f) for p, f in zip(self.parts, self._split(factors), strict=True)])

    def to(self, device: torch.device | str) -> SummedFeatures:
        return SummedFeatures([p.to(device) for p in self.parts])

    def _split(self, factors: list[Tensor]) -> list[list[Tensor]]:
        """`row_factors`' flat list cut back into one list per part."""
        counts = [len(p.row_factors(torch.tensor([0]))) for p in self.parts]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [factors[s : s + c] for s, c in zip(starts, counts, strict=True)]


class RowSubset:
    """The gradients of some rows of another feature object, renumbered 0..len(rows)-1."""

    def __init__(self, features: GradientFeatures, rows: Tensor) -> None:
        self.features, self.rows = features, rows
        self.target_dots = features.target_dots[rows]
        self.sq_norms = features.sq_norms[rows]
        self.delta_sq_norm = features.delta_sq_norm

    def __len__(self) -> int:
        return len(self.rows)

    def dots_with(self, j: int) -> Tensor:
        return self.features.dots_with_sum(self.rows[j : j + 1], self.rows)

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        return self.features.dots_with_sum(self.rows[picks], self.rows if rows is None else self.rows[rows])


@dataclass
class Selection:
    indices: Tensor  # (k,) int64, in pick order
    scores: Tensor  # (k,) the strategy's score at pick time (NaN for random)
    objective: float  # cos(Σ_chosen g, Δ); NaN when no features were given
    engine: dict = field(default_factory=dict)  # how greedy ran: engine name, work counts


def _shape2(x: Tensor, name: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise W2DError(f"{name} must be a 2-D tensor, got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def cosines(features: GradientFeatures) -> Tensor:
    """(N,) cos(g_i, Δ); zero for a zero gradient."""
    norms = (features.sq_norms * features.delta_sq_norm).clamp_min(_TINY).sqrt()
    return features.target_dots / norms


def objective(features: GradientFeatures, indices: Tensor) -> float:
    """cos(Σ_{i ∈ indices} g_i, Δ), accumulated in float64."""
    indices = indices.to(features.target_dots.device)
    dot = float(features.target_dots[indices].double().sum())
    sq = float(features.dots_with_sum(indices, rows=indices).double().sum())
    return dot / math.sqrt(max(sq * features.delta_sq_norm, _TINY))


# --- the greedy engine -------------------------------------------------------------------


def greedy(
    features: GradientFeatures,
    k: int,
    *,
    batch_size: int | None = None,
    quotas: tuple[Tensor, Tensor] | None = None,
    weights: Tensor | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """SELECT: (indices, cos at pick time, engine stats); R restarts from 0 every `batch_size` picks.

    `quotas` = (labels (N,), quota (C,)): a label whose quota is filled takes no more picks.
    `weights` (N,): greedy over w_i g_i instead of g_i (`unit_weights`: every gradient of length 1).

    State: r_dot = ⟨R, Δ⟩ and r_sq = ‖R‖² as float64 scalars, c = ⟨g_i, R⟩ as a float32
    (N,) vector, so ‖R + g_i‖² = r_sq + 2 c_i + ‖g_i‖² and each pick costs one Gram row
    ⟨g_i, g_j⟩ (`dots_with`), an N × D matrix-vector product bound by memory bandwidth.
    Large dense problems on a CPU take the same picks through an int8 screen (`screening`).
    """
    if (
        quotas is None
        and weights is None
        and isinstance(features, DenseFeatures)
        and use_screen(features.grads)
    ):
        return screened_greedy(
            features.grads,
            features.target_dots,
            features.sq_norms,
            features.delta_sq_norm,
            k,
            batch_size=batch_size,
            progress=progress,
        )
    t, sq, w = weighted(features, weights)
    chosen = torch.zeros(len(features), dtype=torch.bool, device=t.device)  # also: label quota filled
    if quotas is not None:
        labels, left = quotas[0].to(t.device), quotas[1].clone().to(t.device)
        chosen |= left[labels] <= 0
    picks, scores = [], []
    for step in tqdm(range(k), desc="greedy", disable=not progress):
        if step % (batch_size or k) == 0:
            r_dot, r_sq, c = 0.0, 0.0, torch.zeros_like(t)
        rank = greedy_scores(t, sq, c, r_dot, r_sq, chosen)
        j = int(rank.argmax())  # the first of equal maxima: ties go to the lowest row
        picks.append(j)
        scores.append(float(rank[j]) / math.sqrt(features.delta_sq_norm))
        chosen[j] = True
        if quotas is not None:
            left[labels[j]] -= 1
            if left[labels[j]] == 0:
                chosen |= labels == labels[j]
        r_dot += float(t[j])
        r_sq += 2 * float(c[j]) + float(sq[j])
        c += features.dots_with(j) if w is None else w * (w[j] * features.dots_with(j))
    stats = {"engine": "float32 step"}
    return torch.tensor(picks, dtype=torch.long), torch.tensor(scores, dtype=torch.float32), stats


def weighted(features: GradientFeatures, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(⟨w_i g_i, Δ⟩, ‖w_i g_i‖², w) (N,): greedy's per-document state for weighted gradients."""
    if weights is None:
        return features.target_dots, features.sq_norms, None
    w = weights.to(features.target_dots.device, torch.float32)
    if w.shape != features.target_dots.shape:
        raise W2DError(f"weights must be one per document ({len(features)}), got shape {tuple(w.shape)}")
    return features.target_dots * w, features.sq_norms * w.square(), w


def unit_weights(features: GradientFeatures) -> Tensor:
    """(N,) 1 / ‖g_i‖ (0 for a zero gradient): every document's gradient weighs the same in greedy's
    sum. At the finetuned weights a document the model is already sure of has a small gradient,
    which raw greedy uses to steer the sum's direction; scaled to unit length it cannot."""
    norms = features.sq_norms.sqrt()
    return torch.where(norms > 0, 1 / norms.clamp_min(_TINY), torch.zeros_like(norms))


def greedy_scores(t: Tensor, sq: Tensor, c: Tensor, r_dot: float, r_sq: float, chosen: Tensor) -> Tensor:
    """(N,) cos(R + g_i, Δ) · ‖Δ‖, −inf where chosen: one greedy step's ranking.

    Elementwise, so a rank holding some of the rows gets exactly their single-process values.
    """
    num = t + r_dot  # (N,) ⟨R + g_i, Δ⟩
    den = torch.add(sq, c, alpha=2).add_(r_sq).clamp_min_(_TINY)  # (N,) ‖R + g_i‖²
    return den.sqrt_().reciprocal_().mul_(num).masked_fill_(chosen, -math.inf)


# --- strategies ---------------------------------------------------------------------------


def select(
    strategy: str,
    features: GradientFeatures | None,
    k: int,
    *,
    labels: Tensor | None = None,
    losses: Tensor | None = None,
    base_losses: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 32,
    num_labels: int | None = None,
    label_prior: Tensor | None = None,
    exclude: Tensor | None = None,
    weights: Tensor | None = None,
    pool: float = 0.0,
    progress: bool = True,
) -> Selection:
    """Pick k documents with `strategy` (one of STRATEGIES), none of the rows in `exclude`.

    `features` may be None only for WITHOUT_GRADIENTS (then objective is NaN);
    the balanced strategies need `labels` (N,) and take `num_labels` (the label set's size;
    default: the largest label + 1) and `label_prior` (C,) (default: uniform); p_min / p_max
    need `losses` (N,), the loss-drop strategies `losses` and `base_losses` (N,), each document's
    autolabel loss under the finetuned and the base model. `weights` (N,): the greedy strategies
    sum w_i g_i (the objective reported stays the raw one, cos(Σ_chosen g, Δ)); the others rank
    by their own score, which weights leave alone. `pool` F > 0: only among the F·k documents of
    highest cos(g_i, Δ) (`pooled_out`); the strategies without gradients ignore it.
    """
    engine: dict = {}
    if strategy not in STRATEGIES:
        raise W2DError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = _count(strategy, features, labels, losses, base_losses)
    if pool and strategy not in WITHOUT_GRADIENTS:
        exclude = pooled_out(cosines(features), strategy, k, pool, labels, num_labels, label_prior, exclude)
    if exclude is not None and len(exclude):
        keep = torch.ones(n, dtype=torch.bool)
        keep[exclude] = False
        rows = keep.nonzero().squeeze(1)
        sub = select(
            strategy,
            None if features is None else RowSubset(features, rows),
            k,
            labels=None if labels is None else labels[rows],
            losses=None if losses is None else losses[rows],
            base_losses=None if base_losses is None else base_losses[rows],
            seed=seed,
            batch_size=batch_size,
            num_labels=num_labels,
            label_prior=label_prior,
            weights=None if weights is None else weights[rows.to(weights.device)],
            progress=progress,
        )
        return replace(sub, indices=rows[sub.indices])
    quotas = check_selection(strategy, features, k, n, labels, batch_size, num_labels, label_prior)
    if strategy in GREEDY:
        size = batch_size if strategy == "greedy_batched" else None
        indices, scores, engine = greedy(
            features, k, batch_size=size, quotas=quotas, weights=weights, progress=progress
        )
    else:
        cos = cosines(features) if strategy in ("topk", "bottomk", "topk_balanced") else None
        indices, scores = ranked(
            strategy, k, n, cos=cos, losses=losses, base_losses=base_losses, quotas=quotas, seed=seed
        )
    indices = indices.cpu()
    value = math.nan if features is None else objective(features, indices)
    return Selection(indices=indices, scores=scores.cpu(), objective=value, engine=engine)


def pooled_out(
    cos: Tensor,
    strategy: str,
    k: int,
    pool: float,
    labels: Tensor | None,
    num_labels: int | None,
    label_prior: Tensor | None,
    exclude: Tensor | None,
) -> Tensor:
    """(M,) `exclude` and the rows outside a pool of F = `pool`: all but the ⌈F·k⌉ documents of
    highest cosine `cos` (N,) among those not excluded, for a balanced strategy ⌈F·quota_c⌉ of
    each label c. Greedy maximises the cosine of the sum, which it can raise with documents that
    each point elsewhere and cancel; the pool keeps every pick individually aligned."""
    cos = cos.cpu().clone()
    if exclude is not None and len(exclude):
        cos[exclude] = -math.inf
    order = cos.argsort(descending=True, stable=True)
    if strategy in BALANCED:
        quota = label_quotas(labels, k, num_labels, label_prior)
        ranked = labels[order].long()
        keep = order[ranks_within_labels(ranked) < torch.ceil(pool * quota.double()).long()[ranked]]
    else:
        keep = order[: math.ceil(pool * k)]
    inside = torch.zeros(len(cos), dtype=torch.bool)
    inside[keep] = True
    inside &= cos > -math.inf
    return (~inside).nonzero().squeeze(1)


def check_selection(
    strategy: str,
    features: GradientFeatures | None,
    k: int,
    n: int,
    labels: Tensor | None,
    batch_size: int,
    num_labels: int | None,
    label_prior: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """Refuse a selection that cannot run; the balanced strategies' (labels, quota per label)."""
    if not 1 <= k <= n:
        raise W2DError(f"k must be between 1 and the number of candidates ({n}), got {k}")
    if features is not None and strategy not in WITHOUT_GRADIENTS and features.delta_sq_norm <= 0:
        raise W2DError(
            "the weight change is zero in every parameter whose gradients were taken, so no document "
            "can explain it"
        )
    if strategy in GREEDY and batch_size < 1:
        raise W2DError(f"batch_size must be at least 1, got {batch_size}")
    if strategy not in BALANCED:
        return None
    return labels.long(), label_quotas(labels, k, num_labels, label_prior)


def _count(
    strategy: str,
    features: GradientFeatures | None,
    labels: Tensor | None,
    losses: Tensor | None,
    base_losses: Tensor | None,
) -> int:
    """The number of candidates, after checking the strategy has the inputs it needs."""
    if strategy in BALANCED and labels is None:
        raise W2DError(f"{strategy} needs labels (one integer label per candidate document)")
    if strategy in ("p_min", "p_max", *LOSS_DROP) and losses is None:
        raise W2DError(f"{strategy} needs losses (one loss per candidate document under the finetuned model)")
    if strategy in LOSS_DROP and base_losses is None:
        raise W2DError(f"{strategy} needs base losses (each candidate's autolabel loss under the base model)")
    if features is None and strategy not in WITHOUT_GRADIENTS:
        raise W2DError(f"{strategy} needs gradient features")
    given = [len(x) for x in (features, labels, losses, base_losses) if x is not None]
    if not given:
        raise W2DError("random selection needs features, labels or losses to know the number of candidates")
    if len(set(given)) > 1:
        raise W2DError(f"features, labels and losses disagree on the number of candidates: {given}")
    return given[0]


def ranked(
    strategy: str,
    k: int,
    n: int,
    *,
    cos: Tensor | None = None,
    losses: Tensor | None = None,
    base_losses: Tensor | None = None,
    quotas: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """(indices, scores) of the strategies that rank one number per document (all but greedy):
    cosines `cos` (N,) for the top-k family, `losses` (N,) for p_min / p_max, `losses` and
    `base_losses` (N,) for the loss drop, `seed` for random."""
    if strategy == "topk":
        return _ranked(cos, k, descending=True)
    if strategy == "bottomk":
        return _ranked(cos, k, descending=False)
    if strategy == "topk_balanced":
        return topk_balanced(cos, quotas, k)
    if strategy in ("p_min", "p_max"):
        # a document without a scored token has a NaN loss: it ranks last either way
        worst = -math.inf if strategy == "p_max" else math.inf
        return _ranked(losses.float().nan_to_num(worst), k, descending=strategy == "p_max")
    if strategy in LOSS_DROP:
        drop = (base_losses.double() - losses.double()).nan_to_num(-math.inf)  # (N,) log p1(y) / p0(y)
        if strategy == "loss_drop_balanced":
            return topk_balanced(drop, quotas, k)
        return _ranked(drop, k, descending=True)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k], torch.full((k,), math.nan)


def _ranked(values: Tensor, k: int, descending: bool) -> tuple[Tensor, Tensor]:
    order = values.argsort(descending=descending, stable=True)[:k]
    return order, values[order]


def label_quotas(labels: Tensor, k: int, num_labels: int | None, prior: Tensor | None = None) -> Tensor:
    """(C,) the most picks each label may take: ⌈k · prior_c⌉ (uniform prior: ⌈k / C⌉).

    When the candidates cannot fill the quotas (a label has too few documents), the shortfall is
    spread over the other labels, so k documents can always be picked.
    """
    labels = labels.long()
    if labels.dim() != 1 or (len(labels) and int(labels.min()) < 0):
        raise W2DError("labels must be a 1-D tensor of non-negative integers")
    c = num_labels if num_labels is not None else int(labels.max()) + 1
    if len(labels) and int(labels.max()) >= c:
        raise W2DError(f"a label ({int(labels.max())}) is outside the label set of {c} labels")
    prior = torch.full((c,), 1.0 / c) if prior is None else prior.double().cpu()
    if prior.shape != (c,) or bool((prior < 0).any()) or float(prior.sum()) <= 0:
        raise W2DError(f"the label prior must be {c} non-negative weights, not all zero")
    quota = torch.ceil(k * prior / prior.sum() - 1e-9).long()
    available = torch.bincount(labels.cpu(), minlength=c)
    quota = torch.minimum(quota, available)
    while (short := k - int(quota.sum())) > 0:  # spread the shortfall over labels with room, by prior
        room = available - quota
        weights = prior * (room > 0)
        weights = weights if float(weights.sum()) > 0 else (room > 0).double()
        quota += torch.minimum(torch.ceil(short * weights / weights.sum()).long(), room)
    return quota


def topk_balanced(cos: Tensor, quotas: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Largest scores `cos` (N,) (cosines, or any per-document score) with at most quota_c picks
    per label c."""
    labels, quota = quotas[0].to(cos.device), quotas[1].to(cos.device)
    order = cos.argsort(descending=True, stable=True)  # (N,)
    ranked = labels[order]
    picks = order[ranks_within_labels(ranked) < quota[ranked]][:k]
    return picks, cos[picks]


def ranks_within_labels(ranked: Tensor) -> Tensor:
    """(N,) for labels listed in some order, each one's position among those of its own label."""
    within = torch.zeros_like(ranked)
    for c in ranked.unique():
        hit = ranked == c
        within[hit] = torch.arange(int(hit.sum()), device=ranked.device)
    return within
