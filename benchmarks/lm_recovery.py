"""Language-modelling recovery end to end, and what the LM gradient features cost.

The protocol of `w2d run --task lm`: finetune smollm2-135m with plain next-token loss on
IMDB review texts (the expert), recover k Wikipedia passages from (base, expert) weights,
train the base model on the true texts, on each selection and on k random passages, and
compare test perplexities on IMDB test texts. Gap closure = (random − recovered) /
(random − expert), on the loss (the product's figure) and on perplexity (the paper's:
Llama-3.2-3B on MS MARCO, k = 5000 of 20,000 NQ passages: SELECT 2.30, random 3.31,
expert ≈ 2.0, closure ≈ 0.77).

Ceiling (`--oracle-only`, after a run): each true training text in turn takes its most
similar untaken corpus passage (all-MiniLM-L6-v2 cosine), and the base model is trained on
those k passages like any selection. It reads the data a method must recover, so it is no
method: it shows how far this corpus can stand in for the true texts at all.

Cost: `lm_features.lm_features` without a cache (forward pass + exact terms + sketch)
timed against the bare forward pass over the same documents, both the full model
(`model(...)`, logits included: what scoring a document's LM loss costs) and the body
alone (`model.base_model(...)`, the final hidden states).

    python benchmarks/lm_recovery.py --quick   # imdb_200, wiki_passages_1000, k = 100
    python benchmarks/lm_recovery.py           # imdb_1000, wiki_passages_10000, k = 1000
    python benchmarks/lm_recovery.py --oracle-only   # adds the ceiling row to that run's JSON
    python benchmarks/lm_recovery.py --summarise a.json,b.json,c.json --out seeds.json   # mean ± std

Prints a markdown table; writes benchmarks/results/lm_recovery.json (atomically).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quality import format_figure, seed_statistics  # the sibling script (benchmarks/ is on the path)
from weights2data.config import DataConfig, EvalConfig, FinetuneConfig, RunConfig, SelectConfig
from weights2data.data import Split, encode_lm
from weights2data.errors import W2DError, exit_on_error
from weights2data.experiment import (
    closure_table,
    format_closure,
    format_table,
    run_experiment,
    selection_training,
)
from weights2data.lm_features import lm_features
from weights2data.metrics import SentenceEmbedder
from weights2data.pipeline import Workspace, finetune_cached
from weights2data.store import cache_dir, read_json, write_json
from weights2data.train import Task, train_eval

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "results" / "lm_recovery.json"
MODEL = "smollm2-135m"
PAPER = {"select_ppl": 2.30, "random_ppl": 3.31, "expert_ppl": 2.0, "closure": 0.77}
SIZES = {
    "quick": {"dataset": "imdb_200", "corpus": "wiki_passages_1000", "k": 100, "timing_docs": 256},
    "full": {"dataset": "imdb_1000", "corpus": "wiki_passages_10000", "k": 1000, "timing_docs": 1024},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    p.add_argument("--scope", default="head", help="train scope of the expert and of every trained model")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="Adam learning rate of every trained model (at 1e-3 a head-only LM expert overshoots "
        "in one epoch and its weight change carries no signal)",
    )
    p.add_argument("--epochs", type=int, default=2, help="expert epochs")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the expert's training texts, the corpus and every training run",
    )
    p.add_argument("--eval-epochs", type=int, default=3, help="epochs for the models trained on each set")
    p.add_argument("--eval-rows", type=int, default=500, help="IMDB test texts scored")
    p.add_argument(
        "--strategies", default="greedy,topk,p_min", help="comma-separated; random is always trained"
    )
    p.add_argument(
        "--lm-loss",
        default="full",
        choices=("full", "last"),
        help="next-token loss on every token or the last",
    )
    p.add_argument(
        "--projection-dim", type=int, default=4096, help="dimension of the sketched LM-head gradients"
    )
    p.add_argument(
        "--grad-blocks",
        type=int,
        default=0,
        help="also the gradients of the top N changed blocks (-1: all); 0: the head only",
    )
    p.add_argument("--timing-docs", type=int, default=None, help="documents for the cost measurement")
    p.add_argument("--dataset", default=None, help="override the expert's dataset (e.g. imdb_500)")
    p.add_argument("--corpus", default=None, help="override the corpus (e.g. wiki_passages_3000)")
    p.add_argument("-k", type=int, default=None, help="override k")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="re-measure only the feature cost (same sizes) and update the cost block of an "
        "existing --out file; the experiment's expert must be cached",
    )
    p.add_argument(
        "--oracle-only",
        action="store_true",
        help="train on the k passages nearest the true texts (a ceiling, not a method) and add "
        "that row to an existing --out file; its expert must be cached",
    )
    p.add_argument(
        "--summarise",
        default=None,
        metavar="FILES",
        help="comma-separated --out files of runs that differ only in --seed (and --strategies): "
        "write each model's mean ± std over seeds to --out instead of running anything",
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--cache-dir", default=None, help="default: $W2D_CACHE_DIR or ~/.cache/weights2data")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    return p.parse_args(argv)


@torch.no_grad()
def time_forward(model: torch.nn.Module, encoded, body_only: bool, batch: int = 32) -> float:
    device = next(model.parameters()).device
    start = time.perf_counter()
    for s in range(0, len(encoded), batch):
        b = encoded.subset(slice(s, s + batch))
        kwargs = {
            "input_ids": b.input_ids.to(device),
            "attention_mask": b.attention_mask.to(device),
            "position_ids": b.position_ids.to(device),
        }
        out = model.base_model(**kwargs).last_hidden_state if body_only else model(**kwargs).logits
        float(out[0, 0, 0])  # synchronise
    return time.perf_counter() - start


def cost(
    ws: Workspace, base_spec: str, expert_path: str, corpus: list[str], seq_len: int, lm_loss: str, dim: int
) -> dict:
    """Feature time over forward time on the same documents (no cache: the forward pass is in both)."""
    base = ws.model(base_spec)
    expert = ws.finetuned(expert_path, base)
    encoded = encode_lm(expert.tokenizer, corpus, seq_len)
    time_forward(expert.model, encoded.subset(slice(0, 32)), body_only=False)  # warm-up

    def features_time(part: slice) -> float:
        start = time.perf_counter()
        lm_features(
            base,
            expert,
            encoded.subset(part),
            lm_loss=lm_loss,
            dim=dim,
            cache_root=None,
            dtype=torch.float32,
            progress=False,
        )
        return time.perf_counter() - start

    # each half timed in the order A B C then C B A, so a shared machine's drifting load hits all three alike
    halves = [slice(0, len(corpus) // 2), slice(len(corpus) // 2, len(corpus))]
    forward_full = time_forward(expert.model, encoded.subset(halves[0]), body_only=False)
    forward_body = time_forward(expert.model, encoded.subset(halves[0]), body_only=True)
    features = features_time(halves[0]) + features_time(halves[1])
    forward_body += time_forward(expert.model, encoded.subset(halves[1]), body_only=True)
    forward_full += time_forward(expert.model, encoded.subset(halves[1]), body_only=False)
    return {
        "docs": len(corpus),
        "tokens_per_doc": float(encoded.attention_mask.sum(1).float().mean()),
        "forward_full_s": round(forward_full, 2),
        "forward_body_s": round(forward_body, 2),
        "features_s": round(features, 2),
        "docs_per_s_features": round(len(corpus) / features, 1),
        "ratio_vs_forward": round(features / forward_full, 3),
        "ratio_vs_body_forward": round(features / forward_body, 3),
    }


def nearest_to_truth(truth: list[str], corpus: list[str], k: int) -> list[int]:
    """Corpus rows: each true text in turn takes its most similar untaken passage, until k are taken."""
    embedder = SentenceEmbedder()
    ranked = np.argsort(-(embedder.embed(truth) @ embedder.embed(corpus).T), axis=1)  # (n_true, N)
    next_rank = np.zeros(len(truth), dtype=int)
    taken: set[int] = set()
    picks: list[int] = []
    while len(picks) < min(k, len(corpus)):
        i = len(picks) % len(truth)
        while int(ranked[i, next_rank[i]]) in taken:
            next_rank[i] += 1
        picks.append(int(ranked[i, next_rank[i]]))
        taken.add(picks[-1])
    return picks


SEED_FIGURES = (
    "val_selected_test", "val_selected_test_perplexity", "best_epoch_test_perplexity",
    "closure_val_selected_test", "closure_best_epoch_test", "closure_perplexity_val_selected_test",
)  # fmt: skip
SETTINGS = ("scope", "expert_dataset", "corpus", "k", "lm_loss", "projection_dim", "grad_blocks", "lr")


def seed_rows(files: list[Path]) -> tuple[list[dict], dict]:
    """One row per (run, model), its table row with the run's seed, and the settings the runs share."""
    rows: list[dict] = []
    first = None
    for path in files:
        data = read_json(path)
        settings = {key: data[key] for key in SETTINGS}
        if first is not None and settings != first:
            raise W2DError(f"{path} was measured with other settings than {files[0]}: {settings} vs {first}")
        first = settings
        table = [*data["run"]["table"], *([data["oracle"]["row"]] if "oracle" in data else [])]
        seed = data.get("seed", 0)  # runs from before the field was recorded were seed 0's
        rows += [{"seed": seed, "file": path.name} | row for row in table]
    return rows, first or {}


def summarise(rows: list[dict]) -> list[dict]:
    """Each model's figures, mean ± std over seeds (a model trained in two runs of one seed: the first)."""
    by_model: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {}).setdefault(row["seed"], row)
    return [
        {"model": model, "seeds": len(runs)} | seed_statistics(list(runs.values()), SEED_FIGURES)
        for model, runs in by_model.items()
    ]


def summary_markdown(summary: list[dict]) -> str:
    lines = [
        "| model | perplexity (honest) | perplexity (best epoch) | closure loss (honest) | "
        "closure loss (best) | closure ppl (honest) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        digits = (1, 1, 2, 2, 2)
        figures = [format_figure(e, key, digits=d) for key, d in zip(SEED_FIGURES[1:], digits, strict=True)]
        lines.append(f"| {e['model']} | {' | '.join(figures)} | {e['seeds']} |")
    return "\n".join(lines)


def command_line(argv: list[str] | None) -> str:
    """How the script was invoked, as results files record it (`argv`: main's, else sys.argv's)."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])


def write_summary(files: list[Path], out: Path, argv: list[str] | None) -> int:
    rows, settings = seed_rows(files)
    summary = summarise(rows)
    header = {"benchmark": "lm_recovery_seeds", "files": [f.name for f in files]} | settings
    write_json(
        out, header | {"rows": rows, "summary": summary, "command": command_line(argv), "complete": True}
    )
    print(summary_markdown(summary) + f"\n\nresults: {out}")
    return 0


def markdown(results: dict) -> str:
    rows = {r["model"]: r for r in results["run"]["table"]}
    if "oracle" in results:
        rows["oracle: nearest to the true texts (a ceiling)"] = results["oracle"]["row"]
    lines = [
        "| model | test loss (honest) | perplexity (honest) | perplexity (best epoch) | closure loss | "
        "closure ppl |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c1 = format_closure(r["closure_val_selected_test"], 3) if "closure_val_selected_test" in r else ""
        key = "closure_perplexity_val_selected_test"
        c2 = format_closure(r[key], 3) if key in r else ""
        lines.append(
            f"| {name} | {r['val_selected_test']:.4f} | {r['val_selected_test_perplexity']:.3f} | "
            f"{r['best_epoch_test_perplexity']:.3f} | {c1} | {c2} |"
        )
    c = results["cost"]
    lines += [
        "",
        f"cost over {c['docs']} documents: features {c['features_s']} s, forward (with logits) "
        f"{c['forward_full_s']} s, body-only forward {c['forward_body_s']} s -> ratio "
        f"{c['ratio_vs_forward']} vs forward, {c['ratio_vs_body_forward']} vs body",
        f"paper (Llama-3.2-3B, MS MARCO): SELECT {PAPER['select_ppl']}, random {PAPER['random_ppl']}, "
        f"expert ~{PAPER['expert_ppl']}, closure ~{PAPER['closure']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        return write_summary([Path(f) for f in args.summarise.split(",")], args.out, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("W2D_DATA_DIR", str(REPO.parent / "shared" / "data"))
    size = dict(SIZES["quick" if args.quick else "full"])
    overrides = {"dataset": args.dataset, "corpus": args.corpus, "k": args.k}
    size.update({key: value for key, value in overrides.items() if value is not None})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from weights2data.config import RuntimeConfig

    rt = RuntimeConfig(cache_dir=args.cache_dir, device=args.device)
    data = DataConfig(dataset=size["dataset"], task="lm", seq_len=32)
    ws = Workspace.from_config(rt, data)
    ft = FinetuneConfig(
        train_scope=args.scope,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=16,
        lm_loss=args.lm_loss,
        seed=args.seed,
    )
    ev = EvalConfig(max_eval_rows=args.eval_rows, eval_epochs=args.eval_epochs, patience=args.eval_epochs)
    sel = SelectConfig(
        k=size["k"], projection_dim=args.projection_dim, grad_blocks=args.grad_blocks, seed=args.seed
    )
    run_cfg = RunConfig(base=MODEL, corpus=size["corpus"], strategies=args.strategies, skip_similarity=True)
    run_name = "-".join(
        ["lm", size["dataset"], size["corpus"], args.scope, *([f"seed{args.seed}"] if args.seed else [])]
    )
    run_dir = Path(cache_dir(args.cache_dir)) / "bench-runs" / run_name.replace(" ", "+").replace(":", "")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.oracle_only:
        results = read_json(args.out)
        expert_data = ws.dataset(size["dataset"], data, ft.seed)
        _, meta = finetune_cached(ws, MODEL, expert_data, data, ft)
        task = Task.from_dict(meta["task"])
        corpus = ws.corpus(size["corpus"], data, sel.k, sel.seed).texts  # as run_experiment takes it
        picks = nearest_to_truth(expert_data.train.texts, corpus, size["k"])
        score = train_eval(
            ws.model(MODEL),
            Split([corpus[i] for i in picks], None),
            expert_data.test,
            task,
            selection_training(ft),
            ev,
            ws.cache,
        )
        scores = {name: results["run"]["scores"][name] for name in ("expert", "random")} | {"oracle": score}
        results["oracle"] = {
            "rule": "each true training text in turn takes its most similar untaken corpus passage "
            "(all-MiniLM-L6-v2 cosine)",
            "row": closure_table(scores, task)[-1],
            "score": score,
            "command": command_line(argv),
        }
        write_json(args.out, results)
        print("\n" + markdown(results))
        return 0
    if args.cost_only:
        results = read_json(args.out)
        expert_path, _ = finetune_cached(ws, MODEL, ws.dataset(size["dataset"], data, ft.seed), data, ft)
        n_timing = args.timing_docs or size["timing_docs"]
        corpus = ws.dataset(size["corpus"], data, sel.seed).train.texts[:n_timing]
        results["cost"] = cost(
            ws, MODEL, str(expert_path), corpus, data.seq_len, args.lm_loss, args.projection_dim
        )
        results["cost"]["command"] = command_line(argv)
        write_json(args.out, results)
        print("\n" + markdown(results))
        return 0
    run = run_experiment(ws, run_dir, data, ft, ev, sel, run_cfg)
    print("\n" + format_table(run), flush=True)
    corpus = ws.dataset(size["corpus"], data, sel.seed).train.texts[: args.timing_docs or size["timing_docs"]]
    measured = cost(ws, MODEL, run["expert_model"], corpus, data.seq_len, args.lm_loss, args.projection_dim)
    results = {
        "benchmark": "lm_recovery",
        "mode": "quick" if args.quick else "full",
        "seed": args.seed,
        "model": MODEL,
        "scope": args.scope,
        "expert_dataset": size["dataset"],
        "corpus": size["corpus"],
        "k": size["k"],
        "lm_loss": args.lm_loss,
        "projection_dim": args.projection_dim,
        "grad_blocks": args.grad_blocks,
        "lr": args.lr,
        "paper": PAPER,
        "run": {key: run[key] for key in ("table", "scores", "selections", "seconds", "metric", "task")},
        "cost": measured,
        "seconds": round(time.time() - started, 1),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(ws.device),
        },
        "command": command_line(argv),
    }
    write_json(args.out, results)
    print("\n" + markdown(results))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    exit_on_error(main)
