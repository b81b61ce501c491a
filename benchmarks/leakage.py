"""Leakage: how much of each selection is the expert's own training data, when the corpus holds it.

The expert's true training rows are planted among the corpus documents; each strategy selects
k documents from the (base, expert) weights, and we count the true rows it picked. Random
selection finds them at their share of the corpus (1,000 of 11,000: 9.1 %). Nothing is trained
on the selections, so this is a cheap and direct test of whether a gradient signal singles out
the training data, e.g. head gradients against head + block gradients in a top:4 finetune.

    python benchmarks/leakage.py --quick
    python benchmarks/leakage.py --datasets ag_news --scope top:4 --grad-blocks 0,4 --seeds 0,1,2
    python benchmarks/leakage.py --task lm --datasets imdb --scope top:4 --grad-blocks 0,4

With --task lm the expert is finetuned with next-token loss on the dataset's texts, as in
benchmarks/lm_recovery.py (32 tokens, lr 1e-4, 2 epochs, batch 16: the same cached expert), and
the documents are scored by its sketched LM-head gradients; the balanced strategies (labels) are skipped.

Writes benchmarks/results/leakage.json (after every group, atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from quality import csv  # the sibling script (benchmarks/ is on the path when run as a script)
from weights2data.config import (
    DEFAULT_LM_LR,
    DEFAULT_LR,
    DataConfig,
    FinetuneConfig,
    SelectConfig,
    parse_scope,
)
from weights2data.data import data_dir
from weights2data.errors import exit_on_error
from weights2data.pipeline import Workspace, finetune_cached, pick_device
from weights2data.recover import recover, task_gradients
from weights2data.selection import BALANCED, LOSS_DROP
from weights2data.store import cache_dir, write_json
from weights2data.train import Task

QUICK = dict(datasets="ag_news", train_rows=100, corpus="wiki_passages_1000", scope="top:2", ks="50",
             grad_blocks="0,2", seeds="0", expert_epochs=2)  # fmt: skip
LM_EXPERT = dict(lr=DEFAULT_LM_LR, expert_epochs=2, batch_size=16)  # lm_recovery.py's expert


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU: " + json.dumps(QUICK))
    p.add_argument("--model", default="smollm2-135m", help="base model (name or local directory)")
    p.add_argument(
        "--task",
        default="classification",
        choices=("classification", "lm"),
        help="lm: a next-token expert on the dataset's texts (labels unused)",
    )
    p.add_argument("--datasets", default="ag_news", help="comma-separated datasets whose rows are planted")
    p.add_argument("--train-rows", type=int, default=1000, help="the expert trains on NAME_<train-rows>")
    p.add_argument("--corpus", default="wiki_passages_10000", help="the documents the true rows hide among")
    p.add_argument("--scope", default="top:4", help="the expert's train scope")
    p.add_argument("--grad-blocks", default="0,4", help="comma-separated --grad-blocks values to compare")
    p.add_argument("--ks", default="100,1000", help="comma-separated selection sizes")
    p.add_argument("--strategies", default="greedy,topk,topk_balanced,p_min,random", help="comma-separated")
    p.add_argument("--seeds", default="0", help="each seed draws the expert's training rows anew")
    p.add_argument("--expert-epochs", type=int, default=None, help="default: 3 (classification), 2 (lm)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (classification), 16 (lm)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    p.add_argument("--data-dir", default=None, help="data directory (default: $W2D_DATA_DIR)")
    p.add_argument(
        "--out", default="benchmarks/results/leakage.json", help="results JSON (written atomically)"
    )
    args = p.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    lm = args.task == "lm"
    args.expert_epochs = args.expert_epochs or (LM_EXPERT["expert_epochs"] if lm else 3)
    args.batch_size = args.batch_size or (LM_EXPERT["batch_size"] if lm else 32)
    if lm:
        args.strategies = ",".join(s for s in csv(args.strategies) if s not in BALANCED)
    return args


def measure(ws: Workspace, args: argparse.Namespace, dataset: str, seed: int, out: dict) -> None:
    """One expert; its true rows planted in the corpus; every gradient set, strategy and k."""
    lm = args.task == "lm"
    data = DataConfig(dataset=f"{dataset}_{args.train_rows}", task=args.task)  # 32 tokens, both tasks
    kind, _ = parse_scope(args.scope)
    expert_ft = FinetuneConfig(
        train_scope=args.scope,
        lr=(LM_EXPERT["lr"] if lm else DEFAULT_LR)[kind],
        epochs=args.expert_epochs,
        batch_size=args.batch_size,
        seed=seed,
    )
    expert_data = ws.dataset(data.dataset, data, seed)
    true_texts = list(expert_data.train.texts)
    texts = true_texts + ws.dataset(args.corpus, data, 0).train.texts  # rows < len(true_texts) are true
    path, meta = finetune_cached(ws, args.model, expert_data, data, expert_ft)
    task = Task.from_dict(meta["task"])
    base = ws.model(args.model)
    expert = ws.finetuned(str(path), base)
    drop = any(s in LOSS_DROP for s in csv(args.strategies))  # the strategies need the base's losses
    for blocks in csv(args.grad_blocks, int):
        sel = SelectConfig(k=max(csv(args.ks, int)), strategy="greedy", grad_blocks=blocks, seed=seed)
        started = time.time()
        grads = task_gradients(base, expert, texts, task, data, sel, ws.cache, drop)
        features_s = round(time.time() - started, 1)
        for strategy in csv(args.strategies):
            for k in csv(args.ks, int):
                pick = SelectConfig(k=k, strategy="greedy", grad_blocks=blocks, seed=seed)
                picked = recover(grads, texts, task.label_set, pick, strategy, progress=False).rows
                row = {
                    "dataset": dataset, "task": args.task, "scope": args.scope, "seed": seed,
                    "grad_blocks": blocks, "strategy": strategy, "k": k,
                    "leaked": float((picked < len(true_texts)).float().mean()),
                    "chance": len(true_texts) / len(texts), "features_s": features_s,
                }  # fmt: skip
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
        write_json(args.out, out)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std of the leaked fraction over seeds, per (dataset, gradient set, strategy, k)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["scope"], r["grad_blocks"], r["strategy"], r["k"]), []).append(
            r["leaked"]
        )
    return [
        {"dataset": d, "scope": s, "grad_blocks": b, "strategy": st, "k": k, "seeds": len(v),
         "leaked": statistics.fmean(v), "leaked_std": statistics.stdev(v) if len(v) > 1 else 0.0}
        for (d, s, b, st, k), v in groups.items()
    ]  # fmt: skip


def markdown(summary: list[dict], chance: float) -> str:
    blocks = sorted({e["grad_blocks"] for e in summary})
    keys = sorted(
        {(e["dataset"], e["scope"], e["strategy"], e["k"]) for e in summary}, key=lambda x: (x[0], x[3])
    )
    index = {(e["dataset"], e["scope"], e["strategy"], e["k"], e["grad_blocks"]): e for e in summary}
    lines = ["| dataset | scope | k | strategy | " + " | ".join(f"grad-blocks {b}" for b in blocks) + " |",
             "|---|---|---|---|" + "---|" * len(blocks)]  # fmt: skip
    for d, s, st, k in keys:
        cells = []
        for b in blocks:
            e = index.get((d, s, st, k, b))
            cells.append("" if e is None else f"{100 * e['leaked']:.1f} ± {100 * e['leaked_std']:.1f} %")
        lines.append(f"| {d} | {s} | {k} | {st} | " + " | ".join(cells) + " |")
    lines.append(f"\nchance (random selection): {100 * chance:.1f} %")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    ws = Workspace(cache_dir(), data_dir(args.data_dir), pick_device(args.device))
    started = time.time()
    out = {"args": vars(args), "device": str(ws.device), "rows": [], "complete": False}
    for dataset in csv(args.datasets):
        for seed in csv(args.seeds, int):
            measure(ws, args, dataset, seed, out)
    out |= {"complete": True, "seconds": round(time.time() - started, 1), "summary": summarise(out["rows"])}
    write_json(args.out, out)
    print(markdown(out["summary"], out["rows"][0]["chance"]))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.backends.cuda.matmul.allow_tf32 = True
    exit_on_error(main)
