"""Adam-aware matching: precondition head gradients by a factored second-moment estimate.

An expert trained with Adam moved by steps ≈ lr · m / √v, so its weight change is close to
D ∘ Σ_t g_t with D = 1 / √v̂ rather than to a plain sum of gradients. Matching D ∘ g_i
against Δ undoes that. For the head, v̂ is estimated from the corpus's own gradients
g_i = e_i h_iᵀ (C × d) and kept rank one, Adafactor-style: with row sums
a_c = mean_i e_ic² ‖h_i‖² and column sums b_d = mean_i ‖e_i‖² h_id², v̂_cd = a_c b_d / Σ_c a_c.
Then D_cd = α_c β_d, and D ∘ (e hᵀ) = (α ∘ e)(β ∘ h)ᵀ: the preconditioned gradient is the
same factored outer product with rescaled factors, so every inner product stays exact.

`kfac` whitens instead of rescaling: the gradients' second moment E[g gᵀ] is approximated by the
Kronecker product A ⊗ B of A = E[e eᵀ] (C × C) and B = E[h hᵀ] (d × d), K-FAC-style, and each
gradient becomes A^{-1/2} e hᵀ B^{-1/2} — the full-matrix analogue of Adam's 1/√v (and the
whitened metric TRAK scores in, with damping), still one factored outer product per document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from weights2data.errors import W2DError

PRECONDITIONERS = ("auto", "none", "adam", "kfac")  # auto: see `resolve`
_EPS = 1e-6  # relative floor under the second moments, as Adam's ε keeps a step finite


def _here(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class CorpusSlice:
    """Which documents a call sees — rows `offset`.. of a corpus of `total` (None: the whole
    corpus) — and how a statistic of them sums over every slice. Under torchrun each rank holds
    one slice and `sum` is an all-reduce, so that the moments a preconditioner is estimated from
    are the whole corpus's, as one process would estimate them."""

    offset: int = 0
    total: int | None = None
    sum: Callable[[Tensor], Tensor] = _here

    def corpus_rows(self, here: int) -> int:
        """The whole corpus's row count, this slice holding `here` of them."""
        return here if self.total is None else self.total


WHOLE = CorpusSlice()


def corpus_mean(sums: Tensor, count: int, corpus: CorpusSlice) -> Tensor:
    """The corpus-wide mean from this slice's `sums` over its `count` rows (float64)."""
    return corpus.sum(sums.double()) / corpus.sum(torch.tensor(float(count), dtype=torch.float64))


def adam_scales(errors: Tensor, hidden: Tensor, corpus: CorpusSlice = WHOLE) -> tuple[Tensor, Tensor]:
    """(C,) α and (d,) β with α_c β_d = 1 / √v̂_cd, from factors errors (N, C) and hidden (N, d)."""
    e2, h2 = errors.double().square(), hidden.double().square()
    rows = corpus_mean((e2 * h2.sum(1, keepdim=True)).sum(0), len(e2), corpus)  # (C,) a_c
    cols = corpus_mean((h2 * e2.sum(1, keepdim=True)).sum(0), len(e2), corpus)  # (d,) b_d
    return factored_scales(rows, cols)


def factored_scales(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """(m,) α and (n,) β with α_i β_j = 1 / √v̂_ij for the rank-one v̂_ij = a_i b_j / Σ a, from the
    mean squared gradient's row sums a (m,) and column sums b (n,) (Adafactor's estimate)."""
    rows, cols = rows.double(), cols.double() / rows.double().sum().clamp_min(1e-300)
    alpha = (rows + _EPS * rows.mean()).rsqrt()
    beta = (cols + _EPS * cols.mean()).rsqrt()
    return alpha.float(), beta.float()


def resolve(kind: str, restricted_head: bool) -> str:
    """The preconditioner `kind` asks for; `auto` is adam for the C × d head gradients of the
    label-token loss (`restricted_head`), where it measured best on every dataset tried
    (benchmarks/RESULTS.md), and none elsewhere (no factored estimate applies)."""
    if kind != "auto":
        return kind
    return "adam" if restricted_head else "none"


@dataclass(frozen=True)
class Metric:
    """The fitted preconditioner: maps on the error factors (C,) or (C, C) and on the hidden
    factors (d,) or (d, d). A vector rescales (adam), a matrix multiplies on the right (kfac)."""

    errors: Tensor
    hidden: Tensor

    def apply(self, errors: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The factors of D ∘ g for factors (..., C) and (..., d)."""
        return _mapped(errors, self.errors), _mapped(hidden, self.hidden)

    def to(self, device: torch.device) -> Metric:
        return Metric(self.errors.to(device), self.hidden.to(device))

    def fingerprint(self) -> str:
        """A hash of the maps: what a cached result computed under this metric is keyed by."""
        return fingerprint([self.errors, self.hidden])


def fingerprint(tensors: list[Tensor]) -> str:
    """A hash of the values of `tensors` (as float32)."""
    blob = b"".join(t.detach().cpu().float().contiguous().numpy().tobytes() for t in tensors)
    return hashlib.sha256(blob).hexdigest()[:16]


def _mapped(x: Tensor, map_: Tensor) -> Tensor:
    return x * map_ if map_.dim() == 1 else x @ map_


def fit_metric(errors: Tensor, hidden: Tensor, kind: str, corpus: CorpusSlice = WHOLE) -> Metric | None:
    """The preconditioner `kind` estimated from the corpus's factors (N, C) and (N, d) (or stacks
    (N, P, ·) of P gradient points, which share one estimate); None for `none`. With `corpus` a
    slice, from the moments of every slice's factors."""
    if kind not in PRECONDITIONERS[1:]:
        raise W2DError(f"unknown preconditioner '{kind}': choose from {', '.join(PRECONDITIONERS[1:])}")
    if kind == "none":
        return None
    flat_e, flat_h = errors.reshape(-1, errors.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    if kind == "kfac":
        moments = (second_moment(flat, corpus) for flat in (flat_e, flat_h))
        return Metric(*(inverse_sqrt(m) for m in moments))
    return Metric(*adam_scales(flat_e, flat_h, corpus))


def precondition(
    errors: Tensor, hidden: Tensor, kind: str, corpus: CorpusSlice = WHOLE
) -> tuple[Tensor, Tensor]:
    """The factors of D ∘ g for every document: (errors ∘ α, hidden ∘ β) for adam, whitened for
    kfac, unchanged for `none`; the estimate is fitted on these factors themselves (every
    slice's, with `corpus` a slice)."""
    metric = fit_metric(errors, hidden, kind, corpus)
    return (errors, hidden) if metric is None else metric.apply(errors, hidden)


def second_moment(x: Tensor, corpus: CorpusSlice = WHOLE) -> Tensor:
    """(k, k) E[x xᵀ] over the rows of x (n, k) (of every slice's x), in float64."""
    x = x.double()
    return corpus_mean(x.T @ x, len(x), corpus)


def inverse_sqrt(m: Tensor, damping: float = _EPS) -> Tensor:
    """(m + λI)^{-1/2} for a symmetric PSD m, λ = damping × its mean eigenvalue; float32."""
    values, vectors = torch.linalg.eigh(m)
    values = values.clamp_min(0) + damping * values.clamp_min(0).mean().clamp_min(1e-300)
    return ((vectors * values.rsqrt()) @ vectors.T).float()
