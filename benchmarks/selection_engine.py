"""Time the selection engine (greedy, topk) and compare greedy with the original's loop.

Synthetic gradient-like data: every gradient shares a common component (as real
per-example gradients do) and Δ is the sum of a hidden 10% "training subset" of the
candidates' gradients plus noise, so the selection has something to find.

Memory: on CPU, the peak resident set size sampled every 2 ms from /proc/self/statm during
the call, minus the RSS just before it (the engine's working memory, not the features);
on GPU, torch.cuda.max_memory_allocated minus the allocation before the call.

    python benchmarks/selection_engine.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from weights2data import screening
from weights2data.errors import exit_on_error
from weights2data.reference import original_greedy
from weights2data.selection import DenseFeatures, FactoredFeatures, GradientFeatures, objective, select
from weights2data.store import write_json

FACTORED = "factored C=4 d=576"
NEAR_TIE = 1e-5  # cosine gap below which two candidates count as tied


def dense_data(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) gradients with a shared mean, and Δ = Σ of a hidden 10% subset + noise."""
    grads = torch.randn(n, d, generator=gen)
    grads += 0.5 * torch.randn(d, generator=gen)
    subset = torch.randperm(n, generator=gen)[: n // 10]
    delta = grads[subset].sum(0)
    delta += torch.randn(d, generator=gen) * delta.norm() / math.sqrt(d)
    return grads, delta


def factored_data(
    n: int, gen: torch.Generator, device: torch.device, c: int = 4, d: int = 576
) -> FactoredFeatures:
    """Softmax errors and hidden states with a shared mean, Δ from a hidden 10% subset."""
    labels = torch.randint(c, (n,), generator=gen)
    errors = torch.randn(n, c, generator=gen).softmax(1) - torch.nn.functional.one_hot(labels, c)
    hidden = torch.randn(n, d, generator=gen) + 2.0 * torch.randn(d, generator=gen)
    subset = torch.randperm(n, generator=gen)[: n // 10]
    delta = errors[subset].T @ hidden[subset]  # (C, d)
    delta += torch.randn(c, d, generator=gen) * delta.norm() / math.sqrt(c * d)
    return FactoredFeatures(errors.to(device), hidden.to(device), delta.to(device))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak extra MB, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20, result
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    return elapsed, max(0, max(peak[0], _rss_bytes()) - base) / 2**20, result


def time_strategy(
    strategy: str, features: GradientFeatures, k: int, repeats: int, device: torch.device
) -> dict:
    runs = [measure(lambda: select(strategy, features, k, progress=False), device) for _ in range(repeats)]
    return {
        "seconds": statistics.median(r[0] for r in runs),
        "runs_s": [round(r[0], 4) for r in runs],
        "peak_extra_mb": max(r[1] for r in runs),
        "objective": runs[0][2].objective,
        "engine": runs[0][2].engine,
    }


def engine_rows(sizes: list[int], dims: list, device: torch.device, gen: torch.Generator) -> list[dict]:
    rows = []
    for n in sizes:
        for d in dims:
            if d == FACTORED:
                features = factored_data(n, gen, device)
            else:
                grads, delta = dense_data(n, d, gen)
                features = DenseFeatures(grads.to(device), delta.to(device))
                del grads
            k = n // 10
            repeats = 3 if n <= 10_000 else 1  # greedy at N = 100k runs for minutes: once
            row = {"N": n, "D": d, "k": k}
            row["greedy"] = time_strategy("greedy", features, k, repeats, device)
            row["topk"] = time_strategy("topk", features, k, 3, device)
            print(
                f"N={n} D={d} k={k}: greedy {row['greedy']['seconds']:.2f}s "
                f"({row['greedy']['peak_extra_mb']:.0f} MB), topk {row['topk']['seconds']:.4f}s",
                flush=True,
            )
            rows.append(row)
            del features
    return rows


def identical_steps(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading picks two selections share (their length when identical)."""
    return int(np.argmax(np.append(a != b, True)))


def reference_row(n: int, d: int, k: int, gen: torch.Generator) -> dict:
    """The engine (float32, CPU) against the original's loop (float64, renormalising)."""
    grads, delta = dense_data(n, d, gen)
    g64, d64 = grads.double().numpy(), delta.double().numpy()
    features = DenseFeatures(grads, delta)
    engine_s, _, sel = measure(lambda: select("greedy", features, k, progress=False), torch.device("cpu"))
    original_s, _, ref = measure(lambda: original_greedy(g64, d64, k), torch.device("cpu"))
    picks = sel.indices.numpy()
    parted = identical_steps(picks, ref)
    gap = None
    if parted < k:  # the two candidates' exact cosines, given the common prefix
        cand = g64[picks[:parted]].sum(0) + g64[[picks[parted], ref[parted]]]
        cos = cand @ d64 / (np.linalg.norm(cand, axis=1) * np.linalg.norm(d64))
        gap = float(abs(cos[0] - cos[1]))

    def exact_objective(idx: np.ndarray) -> float:
        total = g64[idx].sum(0)
        return float(total @ d64 / (np.linalg.norm(total) * np.linalg.norm(d64)))

    obj_engine, obj_original = exact_objective(picks), exact_objective(ref)
    agree = (parted == k or gap < NEAR_TIE) and abs(obj_engine - obj_original) < 1e-3
    return {
        "N": n,
        "D": d,
        "k": k,
        "engine_s": engine_s,
        "original_s": original_s,
        "speedup": original_s / engine_s,
        "identical_steps": parted,
        "gap_at_parting": gap,
        "objective_engine": obj_engine,
        "objective_original": obj_original,
        "objective_via_features": objective(features, sel.indices),
        "agree": bool(agree),
    }


def screen_row(n: int, d: int, k: int, gen: torch.Generator) -> dict:
    """The int8-screened greedy against the float32 step on the same CPU input: time and picks."""
    grads, delta = dense_data(n, d, gen)
    f = DenseFeatures(grads, delta)
    screened_s, _, (picks, _, stats) = measure(
        lambda: screening.screened_greedy(
            grads, f.target_dots, f.sq_norms, f.delta_sq_norm, k, progress=False
        ),
        torch.device("cpu"),
    )
    plain_s, _, plain = measure(lambda: select("greedy", f, k, progress=False), torch.device("cpu"))
    return {
        "N": n,
        "D": d,
        "k": k,
        "screened_s": screened_s,
        "float32_step_s": plain_s,
        "speedup": plain_s / screened_s,
        "identical_steps": identical_steps(picks.numpy(), plain.indices.numpy()),
        "objective_screened": objective(f, picks),
        "objective_float32_step": plain.objective,
        **stats,
    }


def markdown(rows: list[dict], ref: dict | None, screen: dict | None) -> str:
    lines = [
        "| N | D | k | greedy engine | greedy s | greedy peak extra MB | topk s | greedy objective |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, t = r["greedy"], r["topk"]
        lines.append(
            f"| {r['N']} | {r['D']} | {r['k']} | {g['engine'].get('engine', '')} | {g['seconds']:.2f} "
            f"| {g['peak_extra_mb']:.0f} | {t['seconds']:.4f} | {g['objective']:.5f} |"
        )
    if ref:
        tie = ref["gap_at_parting"]
        lines += [
            "",
            f"Original-style greedy (float64, renormalising) N={ref['N']} D={ref['D']} k={ref['k']}: "
            f"{ref['original_s']:.1f}s vs engine {ref['engine_s']:.2f}s ({ref['speedup']:.1f}x); "
            f"identical for {ref['identical_steps']} steps"
            + (f" (then parted, cosine gap {tie:.1e})" if tie is not None else "")
            + f"; objective {ref['objective_engine']:.5f} vs {ref['objective_original']:.5f}; "
            f"agree: {ref['agree']}",
        ]
    if screen:
        lines.append(
            f"int8-screened greedy vs the float32 step N={screen['N']} D={screen['D']} k={screen['k']}: "
            f"{screen['screened_s']:.1f}s vs {screen['float32_step_s']:.1f}s ({screen['speedup']:.2f}x); "
            f"identical for {screen['identical_steps']} steps; objective "
            f"{screen['objective_screened']:.6f} vs {screen['objective_float32_step']:.6f}; "
            f"{screen['rows_read_per_pick']} rows read exactly per pick"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=10k only, D <= 1024, k=1000 (< 5 min)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_engine.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default=None, help="comma-separated N values (default 10000,100000)")
    parser.add_argument("--dims", default=None, help="comma-separated D values, 'factored' for C=4 d=576")
    parser.add_argument("--no-reference", action="store_true", help="skip the original-loop and screen rows")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [10_000] if args.quick else [10_000, 100_000]
    dims = [FACTORED, 1024] if args.quick else [FACTORED, 1024, 4096]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    if args.dims:
        dims = [FACTORED if x == "factored" else int(x) for x in args.dims.split(",")]
    rows = engine_rows(sizes, dims, device, gen)
    ref = screen = None
    if not args.no_reference:
        ref = reference_row(2000, 1024, 200, gen) if args.quick else reference_row(10_000, 1024, 1000, gen)
        if device.type == "cpu" and screening.int8_kernel_available():
            n, k = (20_000, 1000) if args.quick else (50_000, 5000)
            screen = screen_row(n, 1024, k, gen)
    print(markdown(rows, ref, screen))
    write_json(
        args.out,
        {
            "quick": args.quick,
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "memory_method": "CUDA max_memory_allocated delta"
            if device.type == "cuda"
            else "peak RSS sampled every 2 ms minus RSS before the call",
            "engine": rows,
            "reference": ref,
            "screen_vs_float32_step": screen,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    exit_on_error(main)
