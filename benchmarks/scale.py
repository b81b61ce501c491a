"""Scale: peak memory of featurising and selecting many documents, and greedy streamed from disk.

Two measurements, each in a child process of its own so that its peak RSS is its own:

1. featurise: `recover.corpus_gradients` (classification head gradients, hidden states cached on
   disk) over `--docs` Wikipedia passages, then greedy k = `--k`; peak RSS (goal < 4 GiB at
   100,000 documents) and the time of each stage. The default model is tiny-test, so that
   100,000 documents finish on a 2-core CPU; `--model smollm2-135m` measures the real one.
2. stream: greedy over an (N, D) float16 gradient file read in row chunks at every pick
   (`streaming.StreamedFeatures`), against the memory bandwidth measured here: seconds and
   bytes read per pick, and the extrapolation to the issue's size (N = 1,000,000, D = 4096,
   k = 10,000), which would take hours on a 2-core CPU.

    python benchmarks/scale.py                          # both, about 10 minutes on 2 cores
    python benchmarks/scale.py --quick                  # 2,000 docs, N = 20,000: a minute

Prints a summary and writes benchmarks/results/scale_cpu.json (strict JSON, atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weights2data.errors import exit_on_error
from weights2data.store import read_json, write_json
from weights2data.streaming import CHUNK_ROWS

HERE = Path(__file__).resolve().parent
GIB = 2**30
TARGET_N, TARGET_D, TARGET_K = 1_000_000, 4096, 10_000  # the streamed greedy
PARTS = ("featurise", "stream")


def peak_rss() -> int:
    """Bytes: this process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def featurise(args: argparse.Namespace) -> dict:
    """Child: corpus gradients of args.docs passages (cached hidden states), then greedy."""
    from weights2data.config import DataConfig, SelectConfig
    from weights2data.data import data_dir, load_dataset, make_label_set
    from weights2data.models import load_model
    from weights2data.recover import corpus_gradients, recover

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        models = Path(args.cache_dir or Path.home() / ".cache" / "weights2data")
        base = load_model(args.model, cache=models)
        tuned = load_model(f"{args.model}:1" if args.model == "tiny-test" else args.model, cache=models)
        texts = load_dataset(f"wiki_passages_{args.docs}", data_dir=data_dir(None)).train.texts
        loaded_s = time.perf_counter() - started
        label_set = make_label_set(["A", "B", "C", "D"], base.tokenizer, "A,B,C,D")
        sel = SelectConfig(k=args.k, strategy="greedy")
        grads = corpus_gradients(base, tuned, texts, label_set, DataConfig(seq_len=32), sel, Path(cache))
        features_s = time.perf_counter() - started - loaded_s
        recovery = recover(grads, texts, label_set, sel, progress=False)
    return {
        "docs": len(texts),
        "k": args.k,
        "model": args.model,
        "load_s": round(loaded_s, 1),
        "features_s": round(features_s, 1),
        "select_s": recovery.summary["select_s"],
        "peak_rss_gib": round(peak_rss() / GIB, 3),
        "goal_gib": 4,
    }


def bandwidth(d: int) -> float:
    """Bytes/s of the engine's own access pattern on memory: 1 GiB of float32 rows times a vector,
    best of 5 (the ceiling a streamed pick approaches when the page cache holds the file)."""
    rows = torch.ones(GIB // 4 // d, d)
    v = torch.ones(d)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        rows @ v
        best = min(best, time.perf_counter() - started)
    return GIB / best


def stream(args: argparse.Namespace) -> dict:
    """Child: greedy over a gradient file of each dtype, read in row chunks at every pick."""
    from weights2data.selection import greedy
    from weights2data.streaming import StreamedFeatures, write_rows

    n, d = args.stream_n, args.stream_d
    rows, memory = {}, 0.0
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        for dtype in args.stream_dtypes.split(","):
            gen = torch.Generator().manual_seed(0)
            delta = torch.randn(d, generator=gen)

            def chunks(gen=gen, delta=delta):  # gradient-like rows: noise plus a share of Δ
                for start in range(0, n, 8192):
                    m = min(8192, n - start)
                    yield torch.randn(m, d, generator=gen) + torch.rand(m, 1, generator=gen) * delta

            started = time.perf_counter()
            path = write_rows(Path(folder) / f"grads_{dtype}.npy", chunks(), n, d, dtype=dtype)
            write_s = time.perf_counter() - started
            features = StreamedFeatures(path, delta)
            greedy(features, 2, progress=False)  # warm: the page cache holds what fits
            memory = max(memory, bandwidth(d))  # measured between the runs: a busy machine slows both
            before, started = features.bytes_read, time.perf_counter()
            greedy(features, args.stream_k, progress=False)
            step_s = (time.perf_counter() - started) / args.stream_k
            step_bytes = (features.bytes_read - before) / args.stream_k
            rows[dtype] = {
                "write_s": round(write_s, 1),
                "step_s": round(step_s, 4),
                "bytes_per_step": int(step_bytes),
                "read_gb_per_s": round(step_bytes / step_s / 1e9, 2),
                "target_bytes_per_step": TARGET_N * TARGET_D * features.rows.itemsize,
                "target_hours_extrapolated": round(step_s * TARGET_N / n * TARGET_K / 3600, 2),
            }
            path.unlink()
            del features
    memory = max(memory, bandwidth(d))
    for row in rows.values():
        row["share_of_bandwidth"] = round(row["read_gb_per_s"] * 1e9 / memory, 3)
    return {
        "n": n,
        "d": d,
        "k": args.stream_k,
        "chunk_rows": CHUNK_ROWS,
        "memory_bandwidth_gb_per_s": round(memory / 1e9, 2),
        # mapped file pages the steps touched count as resident (reclaimable page cache), as does
        # the 1 GiB bandwidth probe
        "peak_rss_gib": round(peak_rss() / GIB, 3),
        "target": {"n": TARGET_N, "d": TARGET_D, "k": TARGET_K},
        "by_file_dtype": rows,
    }


def in_child(part: str, argv: list[str]) -> dict:
    """Run one part in a fresh process, so that its peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", part, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 documents; N = 20,000, 20 picks")
    parser.add_argument(
        "--docs", type=int, default=100_000, help="documents featurised (default: %(default)s)"
    )
    parser.add_argument("--k", type=int, default=1000, help="greedy picks after featurising")
    parser.add_argument("--model", default="tiny-test", help="model featurised (default: %(default)s)")
    parser.add_argument("--stream-n", type=int, default=100_000, help="rows of the streamed file")
    parser.add_argument("--stream-d", type=int, default=TARGET_D, help="columns of the streamed file")
    parser.add_argument("--stream-k", type=int, default=50, help="streamed greedy picks timed")
    parser.add_argument("--stream-dtypes", default="float32,float16", help="file dtypes streamed")
    parser.add_argument(
        "--parts", default="featurise,stream", help="which to measure; the others keep --out's figures"
    )
    parser.add_argument("--workdir", default=None, help="where the streamed file is written (default: /tmp)")
    parser.add_argument("--cache-dir", default=None, help="where the models are (default: the user cache)")
    parser.add_argument("--out", default=str(HERE / "results" / "scale_cpu.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.docs, args.k, args.stream_n, args.stream_k = 2000, 100, 20_000, 20
    if args.child:
        print(json.dumps({"featurise": featurise, "stream": stream}[args.child](args)))
        return 0
    argv = [a for a in sys.argv[1:] if a != "--quick"]
    quick = ["--docs", str(args.docs), "--k", str(args.k), "--stream-n", str(args.stream_n)]
    quick += ["--stream-k", str(args.stream_k)]
    earlier = read_json(args.out) if Path(args.out).exists() else {}
    kept = {part: earlier[part] for part in PARTS if part in earlier and part not in args.parts.split(",")}
    results: dict = {
        "complete": False,
        "args": vars(args) | {"child": None},
        **kept,  # parts not run now keep an earlier run's figures (each records its own sizes)
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    for part in args.parts.split(","):
        results[part] = in_child(part, [*argv, *quick])
        print(f"{part}: {results[part]}", file=sys.stderr)
        write_json(args.out, results)
    results["complete"] = True
    write_json(args.out, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    exit_on_error(main)
