"""Throughput of feature extraction against a bare forward pass (documents per second).

What a selection costs beyond reading the corpus once: for classification,
`recover.corpus_gradients` (tokenise, forward, last-position hidden state, label-row
softmax errors: the factored head gradients), timed against `model.base_model(...)`
over the same encoded documents with nothing else; for language modelling,
`lm_features.lm_features` (every position's hidden state, exact target terms and the
Kronecker sketch) against the same bare forward over `encode_lm` inputs. No cache is
used (cache_root=None), so every timing includes the forward pass. The finetuned model
is the base model itself, which costs the same per document.

    python benchmarks/throughput.py --quick     # 256 documents (64 on a CPU), < 5 min
    python benchmarks/throughput.py             # 2,000 documents, < 60 min

Prints a markdown table and writes benchmarks/results/throughput.json (atomically).
Target: feature time / forward time <= 1.15 for classification.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from weights2data.config import DataConfig, SelectConfig
from weights2data.data import Encoded, encode_classification, encode_lm, load_dataset, make_label_set
from weights2data.errors import W2DError, exit_on_error
from weights2data.models import load_model
from weights2data.recover import corpus_gradients
from weights2data.store import cache_dir, write_json

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "throughput.json"
MODEL = "smollm2-135m"
SEQ_LENS = (32, 128)
BATCH = 32  # the batch size features.hidden_states uses
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
CLASSIFICATION_TARGET = 1.15


def corpus_texts(n: int, data_dir: str | None) -> list[str]:
    """n Wikipedia passages from the data directory, else synthetic text of similar length."""
    try:
        return load_dataset(f"wiki_passages_{n}", data_dir=Path(data_dir) if data_dir else None).train.texts
    except W2DError as exc:
        print(f"note: {exc}\n  using synthetic documents instead", file=sys.stderr)
        words = "the of and in to a was is for on as by with he at from that his it an were are which".split()
        g = torch.Generator().manual_seed(0)
        return [
            " ".join(words[i] for i in torch.randint(len(words), (150,), generator=g).tolist())
            for _ in range(n)
        ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_forward(model: torch.nn.Module, encoded: Encoded, device: torch.device) -> None:
    """model.base_model over every batch: the least any feature extraction must spend."""
    for start in range(0, len(encoded), BATCH):
        batch = encoded.subset(slice(start, start + BATCH))
        model.base_model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
        )
    sync(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def measure(
    name: str,
    feature_fn: Callable[[], object],
    forward_fn: Callable[[], object],
    n_docs: int,
    repeats: int,
    device: torch.device,
    extra: dict,
) -> dict:
    feature_fn()  # warm-up: kernels, allocator, tokenizer caches
    forward_fn()
    # interleave so that a noisy neighbour slows both sides alike
    feature_t, forward_t = [], []
    for _ in range(repeats):
        feature_t += timed(feature_fn, 1, device)
        forward_t += timed(forward_fn, 1, device)
    feature_s, forward_s = statistics.median(feature_t), statistics.median(forward_t)
    row = {
        "task": name,
        **extra,
        "docs": n_docs,
        "repeats": repeats,
        "forward_s": round(forward_s, 4),
        "feature_s": round(feature_s, 4),
        "forward_docs_per_s": round(n_docs / forward_s, 1),
        "feature_docs_per_s": round(n_docs / feature_s, 1),
        "ratio": round(feature_s / forward_s, 3),
        "forward_times": [round(t, 4) for t in forward_t],
        "feature_times": [round(t, 4) for t in feature_t],
    }
    print(
        f"  {name} seq_len {extra['seq_len']}: forward {forward_s:.3f} s, features {feature_s:.3f} s, "
        f"ratio {row['ratio']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def classification_rows(loaded, texts: list[str], seq_len: int, repeats: int, device: torch.device) -> dict:
    label_set = make_label_set(CLASS_NAMES, loaded.tokenizer, "letters")
    data, sel = DataConfig(seq_len=seq_len), SelectConfig(k=1, strategy="greedy", grad_at="finetuned")
    encoded = encode_classification(loaded.tokenizer, texts, seq_len)
    tokenise_s = timed(lambda: encode_classification(loaded.tokenizer, texts, seq_len), 1, device)[0]

    def features() -> object:
        return corpus_gradients(loaded, loaded, texts, label_set, data, sel, cache_root=None)

    row = measure(
        "classification",
        features,
        lambda: bare_forward(loaded.model, encoded, device),
        len(texts),
        repeats,
        device,
        {"seq_len": seq_len},
    )
    # tokenising runs inside corpus_gradients but not in the bare forward (which reuses `encoded`)
    row["tokenise_s"] = round(tokenise_s, 4)
    row["ratio_ex_tokenise"] = round((row["feature_s"] - tokenise_s) / row["forward_s"], 3)
    return row


def lm_rows(loaded, texts: list[str], seq_len: int, repeats: int, device: torch.device) -> dict:
    from weights2data.lm_features import lm_features

    encoded = encode_lm(loaded.tokenizer, texts, seq_len)

    def features() -> object:
        return lm_features(loaded, loaded, encoded, cache_root=None, progress=False)

    return measure(
        "lm",
        features,
        lambda: bare_forward(loaded.model, encoded, device),
        len(texts),
        repeats,
        device,
        {"seq_len": seq_len, "sketch_dim": 4096},
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | seq len | docs | forward docs/s | feature docs/s | feature / forward "
        "| same, tokenising excluded |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ex = f"{r['ratio_ex_tokenise']:.3f}" if "ratio_ex_tokenise" in r else "(none inside)"
        lines.append(
            f"| {r['task']} | {r['seq_len']} | {r['docs']} | {r['forward_docs_per_s']:.1f} | "
            f"{r['feature_docs_per_s']:.1f} | {r['ratio']:.3f} | {ex} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 documents (64 on a CPU)")
    parser.add_argument(
        "--docs",
        type=int,
        default=None,
        help="documents per measurement (default: 2,000; --quick: 256 on a GPU, 64 on a CPU)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data-dir", default=os.environ.get("W2D_DATA_DIR"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    logging.getLogger("weights2data").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_docs = args.docs or (2000 if not args.quick else 256 if device.type == "cuda" else 64)
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    loaded = load_model(args.model, cache=cache_dir(), device=device)
    loaded.model.eval()
    texts = corpus_texts(n_docs, args.data_dir)
    try:
        import weights2data.lm_features  # noqa: F401

        has_lm, lm_note = True, None
    except ImportError:
        has_lm, lm_note = False, "weights2data.lm_features is not available: LM rows skipped"
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    )
    print(
        f"{args.model} on {device.type} ({hardware}), {n_docs} documents, median of {args.repeats}",
        file=sys.stderr,
        flush=True,
    )

    rows = []
    started = time.time()
    for seq_len in seq_lens:
        rows.append(classification_rows(loaded, texts, seq_len, args.repeats, device))
        if has_lm:
            rows.append(lm_rows(loaded, texts, seq_len, args.repeats, device))
    notes = [n for n in [lm_note] if n]
    worst = max((r["ratio"] for r in rows if r["task"] == "classification"), default=None)
    result = {
        "model": args.model,
        "device": device.type,
        "hardware": hardware,
        "docs": n_docs,
        "repeats": args.repeats,
        "batch_size": BATCH,
        "torch": torch.__version__,
        "classification_target_ratio": CLASSIFICATION_TARGET,
        "classification_meets_target": worst is not None and worst <= CLASSIFICATION_TARGET,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "notes": notes,
    }
    write_json(args.out, result)
    print(markdown(rows))
    for note in notes:
        print(f"\nnote: {note}")
    print(
        f"\nclassification feature/forward: worst {worst} (target <= {CLASSIFICATION_TARGET}); "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    exit_on_error(main)
