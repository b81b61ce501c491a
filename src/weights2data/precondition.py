"""Adam-aware matching: precondition head gradients by a factored second-moment estimate.

An expert trained with Adam moved by steps ≈ lr · m / √v, so its weight change is close to
D ∘ Σ_t g_t with D = 1 / √v̂ rather than to a plain sum of gradients. Matching D ∘ g_i
against Δ undoes that. For the head, v̂ is estimated from the corpus's own gradients
g_i = e_i h_iᵀ (C × d) and kept rank one, Adafactor-style: with row sums
a_c = mean_i e_ic² ‖h_i‖² and column sums b_d = mean_i ‖e_i‖² h_id², v̂_cd = a_c b_d / Σ_c a_c.
Then D_cd = α_c β_d, and D ∘ (e hᵀ) = (α ∘ e)(β ∘ h)ᵀ: the preconditioned gradient is the
same factored outer product with rescaled factors, so every inner product stays exact.
"""

from __future__ import annotations

from torch import Tensor

from weights2data.errors import W2DError

PRECONDITIONERS = ("none", "adam")
_EPS = 1e-6  # relative floor under the second moments, as Adam's ε keeps a step finite


def adam_scales(errors: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """(C,) α and (d,) β with α_c β_d = 1 / √v̂_cd, from factors errors (N, C) and hidden (N, d)."""
    e2, h2 = errors.double().square(), hidden.double().square()
    rows = (e2 * h2.sum(1, keepdim=True)).mean(0)  # (C,) a_c
    cols = (h2 * e2.sum(1, keepdim=True)).mean(0) / rows.sum().clamp_min(1e-300)  # (d,) b_d / Σ a
    alpha = (rows + _EPS * rows.mean()).rsqrt()
    beta = (cols + _EPS * cols.mean()).rsqrt()
    return alpha.float(), beta.float()


def precondition(errors: Tensor, hidden: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """The factors of D ∘ g for every document: (errors ∘ α, hidden ∘ β); unchanged for `none`.

    Works on (N, C) / (N, d) factors or on (N, P, C) / (N, P, d) stacks of P gradient points,
    which share one estimate.
    """
    if kind not in PRECONDITIONERS:
        raise W2DError(f"unknown preconditioner '{kind}': choose from {', '.join(PRECONDITIONERS)}")
    if kind == "none":
        return errors, hidden
    alpha, beta = adam_scales(errors.reshape(-1, errors.shape[-1]), hidden.reshape(-1, hidden.shape[-1]))
    return errors * alpha, hidden * beta
