"""GPU check: throughput, the selection engine and one quality row at paper sizes, in < 10 minutes.

Meant for a machine with one GPU (an 80 GB A100/H100 or larger); three sections, each timed,
each written to the JSON as soon as it is done (`complete` turns true after the last):

1. throughput: documents/s of classification features (`recover.corpus_gradients`, uncached)
   against a bare forward pass, smollm2-135m, 20,000 Wikipedia passages at 32 tokens, in
   float32 and in bfloat16 (`--dtype`: float32 accumulation for the gradient factors);
2. engine: greedy k = 10,000 from N = 1,000,000 gradients of D = 4096 held on the GPU
   (16 GB in float32), seconds per pick; and the same streamed from a float16 file in row
   chunks (`streaming.StreamedFeatures`, N = 200,000, 50 picks), bytes and seconds per pick;
3. quality: `w2d run` on AG News (full finetune on 1,000 rows) recovering k = 1,000 from
   wiki_passages_10000, greedy against random, one seed.

    python benchmarks/gpu_check.py                       # the GPU sizes
    python benchmarks/gpu_check.py --small               # tiny sizes; runs on a CPU in a minute

Writes benchmarks/results/gpu_check_gpu.json (`--small`: gpu_check_small_cpu.json unless --out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from weights2data.errors import exit_on_error
from weights2data.store import read_json, write_json

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    model: str
    docs: int  # throughput documents
    n: int  # engine rows in memory
    d: int
    k: int
    stream_n: int
    stream_k: int
    dataset: str  # quality: the expert's data
    corpus: str
    select_k: int
    eval_rows: int
    eval_epochs: int
    epochs: int  # the expert's


GPU = Sizes(
    model="smollm2-135m",
    docs=20_000,
    n=1_000_000,
    d=4096,
    k=10_000,
    stream_n=200_000,
    stream_k=50,
    dataset="ag_news_1000",
    corpus="wiki_passages_10000",
    select_k=1000,
    eval_rows=2048,
    eval_epochs=3,
    epochs=2,  # a full finetune on 1,000 rows: DESIGN's full regime
)
SMALL = Sizes("tiny-test", 64, 2000, 64, 50, 3000, 5, "ag_news_64", "wiki_passages_256", 16, 64, 1, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def throughput(sizes: Sizes, device: torch.device, dtype: str, cache: Path) -> dict:
    """Documents/s of classification features against a bare forward pass, in `dtype`."""
    from weights2data.config import DataConfig, SelectConfig
    from weights2data.data import data_dir, encode_classification, load_dataset, make_label_set
    from weights2data.models import load_model
    from weights2data.recover import corpus_gradients

    loaded = load_model(sizes.model, cache=cache, device=device, dtype=dtype)
    texts = load_dataset(f"wiki_passages_{sizes.docs}", data_dir=data_dir(None)).train.texts
    label_set = make_label_set(["A", "B", "C", "D"], loaded.tokenizer, "A,B,C,D")
    encoded = encode_classification(loaded.tokenizer, texts, 32)

    @torch.no_grad()
    def forward() -> None:
        for start in range(0, len(encoded), 32):
            batch = encoded.subset(slice(start, start + 32))
            names = ("input_ids", "attention_mask", "position_ids")
            loaded.model.base_model(**{name: getattr(batch, name).to(device) for name in names})

    def features() -> None:
        sel = SelectConfig(k=1, strategy="greedy")
        corpus_gradients(loaded, loaded, texts, label_set, DataConfig(), sel, None)

    forward()  # warm-up
    forward_s, features_s = timed(forward, device), timed(features, device)
    return {
        "model": sizes.model,
        "dtype": dtype,
        "docs": len(texts),
        "forward_docs_per_s": round(len(texts) / forward_s, 1),
        "feature_docs_per_s": round(len(texts) / features_s, 1),
        "ratio": round(features_s / forward_s, 3),
    }


def random_rows(n: int, d: int, delta: torch.Tensor, block: int = 8192):
    """Gradient-like rows in blocks: noise plus a random share of Δ."""
    gen = torch.Generator().manual_seed(1)
    for start in range(0, n, block):
        m = min(block, n - start)
        yield torch.randn(m, d, generator=gen) + torch.rand(m, 1, generator=gen) * delta


def engine(sizes: Sizes, device: torch.device) -> dict:
    """Greedy seconds per pick, gradients in device memory, then streamed from a float16 file."""
    from weights2data.selection import DenseFeatures, greedy
    from weights2data.streaming import StreamedFeatures, write_rows

    gen = torch.Generator(device).manual_seed(0)
    delta = torch.randn(sizes.d, device=device, generator=gen)
    grads = torch.randn(sizes.n, sizes.d, device=device, generator=gen)
    grads += torch.rand(sizes.n, 1, device=device, generator=gen) * delta
    features = DenseFeatures(grads, delta)
    sync(device)
    started = time.perf_counter()
    engine_name = greedy(features, sizes.k, progress=False)[2]["engine"]
    sync(device)
    memory_s = time.perf_counter() - started
    del grads, features  # 16 GB at the GPU sizes
    with tempfile.TemporaryDirectory() as folder:
        rows = random_rows(sizes.stream_n, sizes.d, delta.cpu())
        path = write_rows(Path(folder) / "grads.npy", rows, sizes.stream_n, sizes.d, dtype="float16")
        streamed = StreamedFeatures(path, delta, device=device)
        before = streamed.bytes_read
        stream_s = timed(lambda: greedy(streamed, sizes.stream_k, progress=False), device)
        step_bytes = (streamed.bytes_read - before) / sizes.stream_k
    return {
        "n": sizes.n,
        "d": sizes.d,
        "k": sizes.k,
        "engine": engine_name,
        "in_memory_s_per_pick": round(memory_s / sizes.k, 5),
        "in_memory_gb_per_s": round(sizes.n * sizes.d * 4 / (memory_s / sizes.k) / 1e9, 1),
        "stream_n": sizes.stream_n,
        "stream_k": sizes.stream_k,
        "stream_s_per_pick": round(stream_s / sizes.stream_k, 4),
        "stream_bytes_per_pick": int(step_bytes),
    }


def quality(sizes: Sizes, device: torch.device, out: Path) -> dict:
    """One `w2d run`: expert, greedy and random trained and scored; returns its table."""
    from weights2data.cli import main as w2d

    argv = ["run", "--base", sizes.model, "--dataset", sizes.dataset, "--corpus", sizes.corpus]
    argv += ["-k", str(sizes.select_k), "--strategies", "greedy,random", "--skip-similarity"]
    argv += ["--max-eval-rows", str(sizes.eval_rows), "--eval-epochs", str(sizes.eval_epochs)]
    argv += ["--epochs", str(sizes.epochs)]
    argv += ["--device", str(device), "--results-dir", str(out), "--exp-name", "quality"]
    if w2d(argv) != 0:
        raise SystemExit("the quality run failed (see above)")
    results = read_json(out / "quality" / "results.json")
    return {"argv": argv, "table": results["table"], "seconds": results["seconds"]}


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes (tiny-test): any CPU, a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="throughput dtypes")
    parser.add_argument("--sections", default="throughput,engine,quality")
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $W2D_CACHE_DIR, ~/.cache)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from weights2data.store import cache_dir

    sizes, device = SMALL if args.small else GPU, torch.device(args.device)
    name = "gpu_check_small_cpu.json" if args.small else "gpu_check_gpu.json"
    out = Path(args.out or HERE / "results" / name)
    cache = cache_dir(args.cache_dir)
    results: dict = {
        "complete": False,
        "args": vars(args),
        "sizes": sizes.__dict__,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
    }
    started = time.perf_counter()
    for section in args.sections.split(","):
        section_started = time.perf_counter()
        if section == "throughput":
            results[section] = [throughput(sizes, device, d, cache) for d in args.dtypes.split(",")]
        elif section == "engine":
            results[section] = engine(sizes, device)
        elif section == "quality":
            with tempfile.TemporaryDirectory() as runs:
                results[section] = quality(sizes, device, Path(runs))
        else:
            raise SystemExit(f"unknown section {section!r}")
        results[f"{section}_s"] = round(time.perf_counter() - section_started, 1)
        print(f"{section}: {results[section]}", file=sys.stderr, flush=True)
        write_json(out, results)
    results |= {"complete": True, "total_s": round(time.perf_counter() - started, 1)}
    write_json(out, results)
    print(f"wrote {out} in {results['total_s']} s")
    return 0


if __name__ == "__main__":
    exit_on_error(main)
