"""The original research code's greedy loop, re-implemented for verification only.

Not used by the product: tests and benchmarks compare the incremental engine in
`weights2data.selection` against it.
"""

from __future__ import annotations

import numpy as np


def original_greedy(grads: np.ndarray, delta: np.ndarray, k: int) -> np.ndarray:
    """(k,) indices picked by the original's greedy fill: argmax_i cos(R + g_i, Δ), no repeats.

    Reproduces the original's behaviour, including its cost: every step forms R + G for all
    N candidates in float64, renormalises every row and recomputes every cosine from
    scratch — O(N·D) work plus an (N, D) temporary per step. Slow on purpose.
    """
    g = np.asarray(grads, dtype=np.float64)  # (N, D)
    target = np.asarray(delta, dtype=np.float64)
    target = target / np.linalg.norm(target)  # (D,)
    running = np.zeros(g.shape[1])  # (D,) R
    chosen = np.zeros(g.shape[0], dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for step in range(k):
        candidates = running + g  # (N, D)
        norms = np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-300)
        cos = (candidates / norms) @ target  # (N,)
        cos[chosen] = -np.inf
        j = int(np.argmax(cos))
        picks[step] = j
        chosen[j] = True
        running += g[j]
    return picks
