"""Exact greedy selection over dense gradients at a quarter of the memory traffic (CPU).

The plain greedy step updates c_i = ⟨R, g_i⟩ for every candidate with one float32 (N, D)
product, bound on a CPU by memory bandwidth: 1.6 GB per pick at N = 100,000, D = 4096.
Here that product runs on an int8 copy of the gradients (q_i = s_i·codes_i, one bfloat16
scale per row), which only *estimates* the update, and every row carries a rigorous bound
on how far its estimate can be from c_i. Each pick then brackets every candidate's score,
and only the rows whose bracket reaches the best lower bound are read in full and scored
exactly (float64, against R); reading a row also resets its bound. The picks are those of
the exact greedy (up to rounding at near-ties, as for any floating-point engine).

The bound. A row last read exactly at step τ has estimate c_i(τ) + Σ_{j since τ} y_j(i),
where y_j(i) is the kernel's bfloat16 result for ⟨x̂_j, q_i⟩ and x̂_j is the bfloat16 copy
of the picked g_j. With r_i = g_i − q_i,
    Σ_j ⟨x̂_j, q_i⟩ − ⟨R − R(τ), g_i⟩ = ⟨Σ_j (x̂_j − g_j), q_i⟩ − ⟨Σ_j g_j, r_i⟩,
so |error| ≤ ‖q_i‖·Σ_j ‖x̂_j − g_j‖ + ‖r_i‖·Σ_j ‖g_j‖ + the kernel's rounding (float32 sums
of exact products, then a bfloat16 result), all accumulated per row since τ.

Prefetching. Reading the codes bounds the kernel: four query rows cost about 1.5 times one.
The next pick is usually among the few best-scoring candidates of the current step, so
each pass also computes the products of the best candidates not yet computed (`RowProducts`).
A product depends on its row alone, so it stays valid until that row is picked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

MIN_ELEMENTS = 2**25  # N·D below which the plain step is fast enough (128 MB of float32)
FULL_PASS_SHARE = 0.25  # recompute every row exactly when more than this share survives
PREFETCH = 4  # query rows per kernel pass: the pick and the best candidates without a product
PREFETCH_CAPACITY = 64  # products kept, (N,) bfloat16 each; the oldest goes first
_CODE_MAX = 127
_COLUMN_BLOCK = 64  # the kernel needs the inner dimension in whole blocks; codes are zero-padded
_OUTPUT_ROUNDING = 2.0**-7  # ≥ the bfloat16 result's rounding (2⁻⁸ each, twice) + float32 sums of y
_MARGIN = 1e-9  # relative slack for float64 rounding in the brackets
_TINY = 1e-300


def int8_kernel_available() -> bool:
    """Whether this torch build has the CPU int8-weight matrix product the screen uses.

    `torch._weight_int8pack_mm` is a private op (the kernel behind int8 weight-only
    quantisation), so it is probed and checked rather than assumed; without it, greedy keeps
    the float32 step.
    """
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        codes = torch.ones(8, 96, dtype=torch.int8)
        out = op(torch.ones(1, 96, dtype=torch.bfloat16), codes, torch.ones(8, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(out.float() == 96))


def use_screen(grads: Tensor) -> bool:
    """Screen large CPU problems; a GPU streams the float32 matrix fast enough."""
    return grads.device.type == "cpu" and grads.numel() >= MIN_ELEMENTS and int8_kernel_available()


@dataclass
class Int8Rows:
    """Row-wise symmetric int8 quantisation of (N, D) gradients, with the norms the bounds use."""

    codes: Tensor  # (N, D rounded up to a multiple of 64) int8, zero past D
    scales: Tensor  # (N,) bfloat16
    code_norms: Tensor  # (N,) float64 ‖q_i‖, rounded up
    residual_norms: Tensor  # (N,) float64 ‖g_i − q_i‖, rounded up

    @classmethod
    def build(cls, grads: Tensor, chunk: int = 8192) -> Int8Rows:
        n, d = grads.shape
        codes = torch.zeros(n, -(-d // _COLUMN_BLOCK) * _COLUMN_BLOCK, dtype=torch.int8)
        scales = torch.empty(n, dtype=torch.bfloat16)
        code_norms = torch.empty(n, dtype=torch.float64)
        residual_norms = torch.empty(n, dtype=torch.float64)
        for s in range(0, n, chunk):
            g = grads[s : s + chunk].float()  # (rows, D)
            scale = (g.abs().amax(1) / _CODE_MAX).clamp_min(1e-30).to(torch.bfloat16)
            q = torch.round(g / scale.float()[:, None]).clamp_(-_CODE_MAX, _CODE_MAX)
            codes[s : s + chunk, :d] = q.to(torch.int8)
            scales[s : s + chunk] = scale
            q.mul_(scale.float()[:, None])  # exact: an 8-bit code times an 8-bit scale
            code_norms[s : s + chunk] = q.norm(dim=1).double()
            # float32 rounding of g − q is at most 2⁻²⁴ |g| per element; allow for it
            slack = 2.0**-23 * g.norm(dim=1).double()
            residual_norms[s : s + chunk] = (g - q).norm(dim=1).double() * (1 + 1e-5) + slack
        return cls(codes, scales, code_norms * (1 + 1e-5), residual_norms)

    def dots(self, x_hat: Tensor) -> Tensor:
        """(M, N) the kernel's ⟨x̂_m, q_i⟩ for bfloat16 (M, D) rows x̂ (the result is rounded to bfloat16)."""
        padded = torch.zeros(len(x_hat), self.codes.shape[1], dtype=torch.bfloat16)
        padded[:, : x_hat.shape[1]] = x_hat
        return torch._weight_int8pack_mm(padded, self.codes, self.scales)


class RowProducts:
    """Kernel products of picked rows with every row, computed PREFETCH rows at a time."""

    def __init__(self, grads: Tensor, quantised: Int8Rows) -> None:
        self.grads, self.quantised = grads, quantised
        self.kept: dict[int, Tensor] = {}  # row → (N,) bfloat16 ⟨x̂_row, q_i⟩
        self.passes = 0

    def take(self, j: int, likely: list[int]) -> Tensor:
        """Row j's products; a pass for j also computes those of the first rows in `likely`."""
        if j not in self.kept:
            rows = [j] + [c for c in likely if c != j and c not in self.kept][: PREFETCH - 1]
            products = self.quantised.dots(self.grads[rows].to(torch.bfloat16))  # (len(rows), N)
            self.kept.update(zip(rows, products, strict=True))
            self.passes += 1
            while len(self.kept) > PREFETCH_CAPACITY:
                self.kept.pop(next(iter(self.kept)))
        return self.kept.pop(j)


def screened_greedy(
    grads: Tensor,
    target_dots: Tensor,
    sq_norms: Tensor,
    delta_sq_norm: float,
    k: int,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """(indices, cos at pick time, stats) with selection.greedy's contract.

    cos(R + g_i, Δ) is maximised over unchosen i; R is the sum of the picks since the last
    restart (every `batch_size` picks). stats: rows read exactly per pick, full passes.
    """
    n, d = grads.shape
    quantised = Int8Rows.build(grads)
    products = RowProducts(grads, quantised)
    t, sq = target_dots.double(), sq_norms.double()
    norms = sq.sqrt() * (1 + 1e-12)
    kernel_rounding = d * 2.0**-24  # float32 sums of d exact bfloat16 × int8 products
    full_rounding = (d + 2) * 2.0**-24  # a float32 product of d terms, with R cast to float32
    chosen = torch.zeros(n, dtype=torch.bool)
    picks, scores, rows_read, full_passes = [], [], 0, 0
    for step in tqdm(range(k), desc="greedy (int8 screen)", disable=not progress):
        if step % (batch_size or k) == 0:
            total = torch.zeros(d, dtype=torch.float64)  # R
            estimate = torch.zeros(n, dtype=torch.float64)  # c_i at the last exact read + Σ y since
            width = torch.zeros(n, dtype=torch.float64)  # bound on |estimate − c_i|
            r_dot, r_sq = 0.0, 0.0
        num = t + r_dot  # (N,) ⟨R + g_i, Δ⟩
        base = sq + r_sq  # (N,) ‖g_i‖² + ‖R‖²
        rows = _survivors(num, base, estimate, width, chosen)
        if len(rows) > FULL_PASS_SHARE * n:
            estimate = (grads @ total.float()).double()
            width = norms * (full_rounding * float(total.norm()))
            full_passes += 1
            rows = _survivors(num, base, estimate, width, chosen)
        exact = grads[rows].double() @ total  # (m,) ⟨R, g_i⟩
        estimate[rows], width[rows] = exact, 0.0
        rows_read += len(rows)
        score = num[rows] / (base[rows] + 2 * exact).clamp_min(_TINY).sqrt()
        best = int(score.argmax())
        j = int(rows[best])
        likely = rows[score.topk(min(PREFETCH, len(rows))).indices].tolist()  # the next picks, likely
        picks.append(j)
        scores.append(float(score[best]) / math.sqrt(delta_sq_norm))
        chosen[j] = True
        r_dot += float(t[j])
        r_sq += 2 * float(exact[best]) + float(sq[j])
        g = grads[j].double()
        total += g
        estimate.add_(products.take(j, likely))
        x_hat = grads[j].to(torch.bfloat16).double()  # what the kernel multiplied
        # ‖g_j‖ ‖r_i‖ + ‖q_i‖ (‖x̂_j − g_j‖ + the kernel's float32 sums + its bfloat16 result,
        # using |y| ≤ ‖x̂_j‖ ‖q_i‖)
        width.add_(quantised.residual_norms, alpha=float(norms[j]))
        x_error = float((x_hat - g).norm()) + (kernel_rounding + _OUTPUT_ROUNDING) * float(x_hat.norm())
        width.add_(quantised.code_norms, alpha=x_error)
    stats = {
        "engine": "int8 screen",
        "full_passes": full_passes,
        "kernel_passes_per_pick": round(products.passes / k, 2),
        "rows_read_per_pick": round(rows_read / k, 1),
    }
    return torch.tensor(picks, dtype=torch.long), torch.tensor(scores, dtype=torch.float32), stats


def _survivors(num: Tensor, base: Tensor, estimate: Tensor, width: Tensor, chosen: Tensor) -> Tensor:
    """Unchosen rows whose score bracket reaches the best lower bound (all (N,) float64).

    The score is num / √(base + 2c) with c ∈ [estimate − width, estimate + width]: it rises
    as the denominator falls when num ≥ 0 and the other way round when num < 0.
    """
    den_lo = torch.add(base, estimate - width, alpha=2).clamp_min_(_TINY)
    den_hi = torch.add(base, estimate + width, alpha=2).clamp_min_(_TINY)
    positive = num >= 0
    upper = num / torch.where(positive, den_lo, den_hi).sqrt_()
    lower = (num / torch.where(positive, den_hi, den_lo).sqrt_()).masked_fill_(chosen, -math.inf)
    best_lower = float(lower.max())
    return torch.nonzero((upper >= best_lower - _MARGIN * abs(best_lower)) & ~chosen).squeeze(1)
