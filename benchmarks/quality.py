"""Quality: the paper's main table, measured — expert / recovered / random accuracy and gap closure.

For each dataset, training regime (scope) and seed: finetune the expert on NAME_<train-rows>,
take the corpus gradients once, then for every label rule, projection dimension, k and
strategy select k documents, train the base model on them and score it on the expert's test
split, next to the expert (trained on the true rows) and random (k random corpus documents
labelled by the same rule). Both figures are kept: the original's best test accuracy over
epochs and the honest one (epoch chosen on a validation split of the training set, or with
--honest-by agreement on agreement with the expert's labels on held-out corpus documents).

    python benchmarks/quality.py --quick
    python benchmarks/quality.py --datasets ag_news --scopes head,top:4 --ks 1000,100
    python benchmarks/quality.py --datasets ag_news --scopes top:4 --ks 100,500,1000,2500   # k sweep
    python benchmarks/quality.py --datasets ag_news --scopes top:4 --projection-dims 0,512,1024,4096
    python benchmarks/quality.py --datasets ag_news --scopes top:4 --label-rules auto,random
    python benchmarks/quality.py --datasets ag_news --scopes top:4 --grad-blocks 0,4   # head vs head + blocks
    python benchmarks/quality.py --datasets ag_news --scopes top:4 \
        --select-options "grad_at=finetuned; grad_at=base; pseudo_experts=4 path_combine=concat"
    python benchmarks/quality.py --datasets imdb --scopes top:2 --record-proxies   # + agreement, weight_cos

Results go to benchmarks/results/quality.json (rewritten after every trained model, so an
interrupted run keeps what it measured) and a markdown table on stdout. Every score is also
cached (train_eval): the same command run again, or another sharing its expert and random
rows, trains only what it has not trained before.

    python benchmarks/quality.py --summarise benchmarks/results/quality_imdb_top4_*.json

prints the table of several results files measured with the same settings (the expert and
random rows they share count once), training nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from weights2data.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    SelectConfig,
    parse_scope,
    select_overrides,
)
from weights2data.data import Dataset, Split, data_dir
from weights2data.errors import exit_on_error
from weights2data.experiment import agreement_reference, as_split, closure, selection_training
from weights2data.models import LoadedModel
from weights2data.pipeline import Workspace, finetune_cached, pick_device
from weights2data.recover import corpus_gradients, finetuned_predictions, recover
from weights2data.rounds import recover_in_rounds
from weights2data.selection import LOSS_DROP
from weights2data.store import cache_dir, write_json
from weights2data.train import Task, train_eval
from weights2data.trajectory import expert_settings

LEARNING_RATES = {"head": 1e-3, "top": 1e-4, "full": 2e-5}  # per regime; full is the original's 2e-5
# every benchmark's --quick: a small expert, corpus and evaluation (minutes on a CPU)
SMOKE = dict(
    train_rows=200, corpus="wiki_passages_1000", seeds="0", eval_epochs=3, max_eval_rows=300, expert_epochs=2
)
QUICK = SMOKE | dict(datasets="ag_news", scopes="head", ks="100", strategies="greedy,topk")
# the rows that are no selection strategy's: what every strategy is measured against
BASELINES = ("expert", "true_k", "random", "random_confident")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, out="benchmarks/results/quality.json", quick=QUICK)
    p.add_argument(
        "--datasets",
        default="ag_news,newsgroup,imdb,rotten_tomatoes",
        help="comma-separated classification datasets",
    )
    p.add_argument(
        "--scopes", default="top:4,head", help="comma-separated training regimes: head, top:N, full"
    )
    p.add_argument("--ks", default="1000,100", help="comma-separated selection sizes")
    p.add_argument(
        "--strategies",
        default="greedy,greedy_batched,topk,topk_balanced,p_min",
        help="comma-separated; random is always trained as the baseline",
    )
    p.add_argument(
        "--label-rules", default="auto", help="comma-separated: auto (expert's prediction), random"
    )
    p.add_argument(
        "--projection-dims", default="0", help="comma-separated: 0 = exact gradients, D = JL projection to D"
    )
    p.add_argument(
        "--grad-blocks",
        default="0",
        help="comma-separated: 0 = head gradients only, "
        "N = also the top N changed blocks, -1 = every changed block",
    )
    p.add_argument(
        "--select-options",
        default="",
        help="';'-separated variants, each space-separated SelectConfig settings (e.g. "
        "'grad_at=base; pseudo_experts=4 path_combine=concat; precondition=adam'); every "
        "strategy is selected and trained under each; empty: the defaults",
    )
    p.add_argument(
        "--no-true-k",
        action="store_true",
        help="skip the true_k reference rows (the base trained on k of the expert's own training rows)",
    )
    p.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSON",
        help="print the mean ± std table of these results files and exit; nothing is trained",
    )
    return parse_quick(p, QUICK)


def add_common_args(p: argparse.ArgumentParser, out: str, quick: dict) -> None:
    """The options every benchmark built on `expert_group` reads: the expert, the corpus, training
    and scoring, the seeds, the budget and where results go; --quick sets `quick`."""
    p.add_argument("--quick", action="store_true", help="a smoke run, minutes on a CPU: " + json.dumps(quick))
    p.add_argument("--model", default="smollm2-135m", help="base model (name or local directory)")
    p.add_argument("--train-rows", type=int, default=1000, help="the expert trains on NAME_<train-rows>")
    p.add_argument(
        "--verbalizer",
        default="letters",
        help="label tokens: letters (A, B, ... as the original), names, or a comma-separated word list "
        "(e.g. 'World,Sports,Business,Science'), as w2d's --verbalizer",
    )
    p.add_argument(
        "--template",
        default=None,
        help="prompt template with one {text} slot (\\n: a newline), as w2d's --template: the expert, "
        "every selection and every training set use it; default: the original's plain `text label`",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=32,
        help="tokens per example, the label token included, as w2d's --seq-len: the expert, every "
        "selection and every training set",
    )
    p.add_argument(
        "--label-loss",
        choices=("restricted", "full"),
        default=None,
        help="the expert's and every training set's classification loss, as w2d's --label-loss: "
        "restricted (over the label tokens, the original's) or full (the whole vocabulary, as a usual "
        "trainer); selection follows the expert's; default: restricted",
    )
    p.add_argument(
        "--corpus", default="wiki_passages_10000", help="dataset(s) to select from, space-separated"
    )
    p.add_argument(
        "--seeds",
        default="0",
        help="each seed draws the expert's training rows "
        "and every training run's order and initial state anew",
    )
    p.add_argument(
        "--corpus-seed",
        type=int,
        default=0,
        help="which NAME_N subset of the corpus; "
        "fixed across --seeds, so the corpus's hidden states are computed once",
    )
    p.add_argument("--expert-epochs", type=int, default=3, help="epochs of the expert's finetune")
    p.add_argument("--eval-epochs", type=int, default=10, help="most epochs of each train-evaluate run")
    p.add_argument(
        "--patience",
        type=int,
        default=4,
        help="stop a train-evaluate run after this many epochs without improvement",
    )
    p.add_argument(
        "--honest-by",
        choices=("validation", "agreement"),
        default="validation",
        help="what picks the honest figure's epoch, as w2d's --honest-by: the loss on a validation "
        "split of each training set, or agreement with the expert's labels on 500 held-out corpus "
        "documents (each row then records its agreement)",
    )
    p.add_argument(
        "--record-proxies",
        nargs="?",
        const="all",
        choices=("all", "selected"),
        help="also record, at the epoch the honest protocol chose, what could rank training sets "
        "without the test set: agreement (plain and per-label balanced) with the expert's labels on "
        "the held-out corpus documents, and weight_cos, the cosine between the weight change of "
        "training on the set and the expert's (see benchmarks/strategy_choice.py); `selected`: for "
        "the selected sets only, so the expert's and random rows, which no rule chooses among, are "
        "read from runs cached without proxies (their test figures are the same either way)",
    )
    p.add_argument("--max-eval-rows", type=int, default=2048, help="test rows scored per epoch")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--time-budget", type=float, default=3600, help="seconds; stops cleanly after this")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    p.add_argument("--data-dir", default=None, help="data directory; None: $W2D_DATA_DIR")
    p.add_argument("--out", default=out, help="results JSON (written atomically)")


def add_one_expert_args(p: argparse.ArgumentParser, k_help: str) -> None:
    """--dataset, --scope and --k: one expert and one selection size, for defences and synthesis."""
    p.add_argument("--dataset", default="ag_news", help="the expert's classification dataset")
    p.add_argument("--scope", default="top:4", help="the expert's training regime: head, top:N or full")
    p.add_argument("--k", type=int, default=100, help=k_help)


def parse_quick(p: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """The parsed flags; with --quick, `quick`'s settings replace theirs."""
    args = p.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args


def csv(text: str, kind: type = str) -> list:
    return [kind(x.strip()) for x in str(text).split(",") if x.strip()]


def select_variants(text: str) -> list[str]:
    """The --select-options variants, each normalised ("" is the defaults)."""
    variants = [" ".join(sorted(v.split())) for v in text.split(";")]
    return list(dict.fromkeys(variants)) or [""]


class Budget(Exception):
    """The time budget ran out; results so far are kept."""


def main() -> None:
    args = parse_args()
    if args.summarise:
        print(markdown(summarise(merged_rows(args.summarise))))
        return
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    ws = Workspace(cache_dir(), data_dir(args.data_dir), device)

    def measure(out: dict, started: float) -> None:
        for dataset in csv(args.datasets):
            for scope in csv(args.scopes):
                for seed in csv(args.seeds, int):
                    run_group(ws, args, dataset, scope, seed, out, started)

    run_measurement(args, device, measure, summarise, markdown)


def run_seeds(
    args: argparse.Namespace,
    run_seed: Callable[[Group, argparse.Namespace], None],
    summarise: Callable[[list[dict]], list[dict]],
    markdown: Callable[[list[dict]], str],
) -> None:
    """run_seed on the expert of --dataset and --scope for every seed (defences.py, synthesis.py)."""
    device = pick_device(args.device)
    ws = Workspace(cache_dir(), data_dir(args.data_dir), device)

    def measure(out: dict, started: float) -> None:
        for seed in csv(args.seeds, int):
            run_seed(expert_group(ws, args, args.dataset, args.scope, seed, out, started), args)

    run_measurement(args, device, measure, summarise, markdown)


def run_measurement(
    args: argparse.Namespace,
    device: torch.device,
    measure: Callable[[dict, float], None],
    summarise: Callable[[list[dict]], list[dict]],
    markdown: Callable[[list[dict]], str],
) -> None:
    """measure(out, started) fills out["rows"]; at the time budget the rows so far are kept, with
    `complete: false`. Then the summary, the results file and the table."""
    started = time.time()
    out = {"args": vars(args), "device": str(device), "rows": [], "complete": False}
    try:
        measure(out, started)
        out["complete"] = True
    except Budget:
        print(f"time budget of {args.time_budget:.0f} s reached; writing partial results")
    out["seconds"] = round(time.time() - started, 1)
    out["summary"] = summarise(out["rows"])
    write_json(args.out, out)
    print(markdown(out["summary"]))
    print(f"\nwritten {args.out}")


@dataclass
class Group:
    """One expert and what every training run scored against its test split shares."""

    ws: Workspace
    args: argparse.Namespace
    dataset: str
    scope: str
    seed: int
    data: DataConfig
    expert_data: Dataset
    corpus: Split
    task: Task
    base: LoadedModel
    expert: LoadedModel
    test_ft: FinetuneConfig
    ev: EvalConfig
    reference: Split | None  # --honest-by agreement: corpus documents with the expert's labels
    out: dict  # the results file's content: scored rows are appended to out["rows"]
    started: float


def expert_group(
    ws: Workspace, args: argparse.Namespace, dataset: str, scope: str, seed: int, out: dict, started: float
) -> Group:
    """Finetune (or reuse) the expert of one dataset, scope and seed, and load what scoring needs."""
    kind, _ = parse_scope(scope)
    batch = 512 if ws.device.type == "cuda" else 64
    data = DataConfig(
        dataset=f"{dataset}_{args.train_rows}",
        verbalizer=args.verbalizer,
        template=args.template,
        label_loss=args.label_loss,
        seq_len=args.seq_len,
    )
    expert_ft = FinetuneConfig(
        train_scope=scope,
        lr=LEARNING_RATES[kind],
        epochs=args.expert_epochs,
        batch_size=args.batch_size,
        seed=seed,
    )
    ev = EvalConfig(
        max_eval_rows=args.max_eval_rows,
        eval_epochs=args.eval_epochs,
        patience=args.patience,
        honest_by=args.honest_by,
        eval_batch_size=batch,
    )
    expert_data = ws.dataset(data.dataset, data, seed)
    corpus = ws.dataset(args.corpus, data, args.corpus_seed).train
    path, meta = finetune_cached(ws, args.model, expert_data, data, expert_ft)
    base = ws.model(args.model)
    expert = ws.finetuned(str(path), base)
    task = Task.from_dict(meta["task"])
    test_ft = selection_training(expert_ft)
    reference = None
    if ev.honest_by == "agreement" or args.record_proxies:
        predicted = finetuned_predictions(base, expert, corpus.texts, task.label_set, data, ws.cache)
        reference = agreement_reference(corpus, predicted, ev, seed)
    return Group(ws, args, dataset, scope, seed, data, expert_data, corpus, task,
                 base, expert, test_ft, ev, reference, out, started)  # fmt: skip


def score(group: Group, name: str, split: Split, extra: dict) -> dict:
    """Train-evaluate `split` and record its row (rewriting the results file); a training set met
    before (random across variants) is read from the train_eval cache, not trained again."""
    args = group.args
    if time.time() - group.started > args.time_budget:
        raise Budget
    t0 = time.time()
    ws = group.ws
    proxies = args.record_proxies == "all" or (args.record_proxies == "selected" and name not in BASELINES)
    result = train_eval(
        ws.model(args.model),
        split,
        group.expert_data.test,
        group.task,
        group.test_ft,
        group.ev,
        ws.cache,
        group.reference if proxies or group.ev.honest_by == "agreement" else None,
        group.expert if proxies else None,
    )
    row = {
        "dataset": group.dataset,
        "scope": group.scope,
        "seed": group.seed,
        "train": name,
        **extra,
        "best_epoch_test": result["best_epoch_test"],
        "val_selected_test": result["val_selected_test"],
        **{key: result[key] for key in ("agreement", "balanced_agreement", "weight_cos") if key in result},
        "epochs_run": len(result["epochs"]),
        "seconds": round(time.time() - t0, 1),
    }
    group.out["rows"].append(row)
    write_json(args.out, group.out)
    print(json.dumps(row))
    return row


def run_group(
    ws: Workspace, args: argparse.Namespace, dataset: str, scope: str, seed: int, out: dict, started: float
) -> None:
    """One expert; every label rule, projection, k and strategy trained against it."""
    group = expert_group(ws, args, dataset, scope, seed, out, started)
    data, expert_data, corpus, task = group.data, group.expert_data, group.corpus, group.task
    base, expert = group.base, group.expert
    expert_row = score(group, "expert", expert_data.train, {"k": len(expert_data.train)})
    if not args.no_true_k:  # what k documents can teach at best: k of the expert's own rows, true labels
        for k in csv(args.ks, int):
            rows = np.random.default_rng(seed).permutation(len(expert_data.train))[:k]
            score(group, "true_k", expert_data.train.subset(np.sort(rows)), {"k": k})
    strategies = [s for s in csv(args.strategies) if s != "random"]  # random: the baseline, trained below
    drop = any(s in LOSS_DROP for s in strategies)  # the strategies need the base's losses
    for rule in csv(args.label_rules):
        variants = [
            (d, b, v)
            for d in csv(args.projection_dims, int)
            for b in csv(args.grad_blocks, int)
            for v in select_variants(args.select_options)
        ]
        for dim, blocks, variant in variants:
            sel = SelectConfig(
                k=max(csv(args.ks, int)),
                strategy="greedy",
                labels=rule,
                projection_dim=dim,
                grad_blocks=blocks,
                seed=seed,
                **select_overrides(variant),
            )
            t0 = time.time()
            grads = corpus_gradients(base, expert, corpus.texts, task.label_set, data, sel, ws.cache, drop)
            features_s = round(time.time() - t0, 1)
            for k in csv(args.ks, int):
                extra = {"k": k, "labels": rule, "projection_dim": dim, "grad_blocks": blocks}
                extra |= {"select": variant, "features_s": features_s}
                # the original's random baseline, whatever the variant filters (keep_confident)
                baseline = replace(sel, k=k, keep_confident=1.0)
                random_split = as_split(
                    recover(grads, corpus.texts, task.label_set, baseline, "random", progress=False)
                )
                rand = score(group, "random", random_split, extra)
                if sel.keep_confident < 1:  # random among the kept documents: how much is the filter alone?
                    kept = recover(
                        grads, corpus.texts, task.label_set, replace(sel, k=k), "random", progress=False
                    )
                    add_closures(score(group, "random_confident", as_split(kept), extra), rand, expert_row)
                for strategy in strategies:
                    if sel.rounds == 1:
                        recovery = recover(grads, corpus.texts, task.label_set, replace(sel, k=k), strategy)
                    else:
                        student = expert_settings(base, expert, sel.student_steps)
                        recovery = recover_in_rounds(
                            base, expert, corpus.texts, task, data, replace(sel, k=k), student, strategy,
                            ws.cache, grads,
                        )  # fmt: skip
                    row = score(
                        group,
                        strategy,
                        as_split(recovery),
                        {
                            **extra,
                            "select_s": recovery.summary["select_s"],
                            "objective_cos": recovery.summary["objective_cos"],
                            "label_distribution": recovery.summary.get("label_distribution"),
                            "label_confidence": recovery.summary.get("label_confidence"),
                        },
                    )
                    add_closures(row, rand, expert_row)
                    write_json(args.out, out)  # a killed run keeps every row whole, closures included


def add_closures(row: dict, random_row: dict, expert_row: dict) -> None:
    """The row's closure of the gap between random and the expert, for both accuracy figures."""
    for figure in ("best_epoch_test", "val_selected_test"):
        row[f"closure_{figure}"] = closure(row[figure], random_row[figure], expert_row[figure])


# every setting that changes a row's figures besides what the row itself records (and the device)
SETTINGS = (
    "model", "train_rows", "corpus", "corpus_seed", "expert_epochs",
    "eval_epochs", "patience", "max_eval_rows", "batch_size", "verbalizer", "template",
    "label_loss", "honest_by", "seq_len",
)  # fmt: skip


def merged_rows(paths: list[str]) -> list[dict]:
    """The rows of several results files, each (seed, table line) once.

    Files measured with different settings are refused: their rows do not average.
    """
    rows: dict[tuple, dict] = {}
    first: dict | None = None
    for path in paths:
        try:
            with open(path) as f:
                results = json.load(f)
            # older files: letters before --verbalizer, 32 tokens before --seq-len (no --template: plain)
            args = {"verbalizer": "letters", "honest_by": "validation", "seq_len": 32} | results["args"]
            settings = {key: args.get(key) for key in SETTINGS} | {"device": results["device"]}
            file_rows = list(results["rows"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(f"{path}: not a results file of quality.py ({exc!r})") from exc
        if first is not None and settings != first:
            differ = ", ".join(
                f"{k}: {first[k]} vs {settings[k]}" for k in settings if first[k] != settings[k]
            )
            raise SystemExit(f"{path} was measured with other settings than {paths[0]} ({differ})")
        first = settings
        for row in file_rows:
            rows.setdefault((row["seed"], *table_key(row)), row)
    return list(rows.values())


def table_key(row: dict) -> tuple:
    """(dataset, scope, k, labels, projection, blocks, select options, training set): one table line.

    Random documents do not depend on the select options (only on the label rule): one line.
    """
    expert = row["train"] == "expert"
    if row["train"] == "true_k":
        return (row["dataset"], row["scope"], row["k"], "-", "-", "-", "-", "true_k")
    return (
        row["dataset"],
        row["scope"],
        "-" if expert else row["k"],
        row.get("labels", "-"),
        row.get("projection_dim", "-"),
        "-" if expert else row.get("grad_blocks", 0),
        "-" if row["train"] in ("expert", "random") else row.get("select", ""),
        row["train"],
    )


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds for each (dataset, scope, k, labels, projection, training set)."""
    groups: dict[tuple, dict[int, dict]] = {}
    for row in rows:  # one row per seed: random is trained once and recorded beside every variant
        groups.setdefault(table_key(row), {}).setdefault(row["seed"], row | confidence_figures(row))
    summary = []
    for key, by_seed in groups.items():
        members = list(by_seed.values())
        names = ("dataset", "scope", "k", "labels", "projection_dim", "grad_blocks", "select", "train")
        entry = dict(zip(names, key, strict=True))
        entry["seeds"] = len(members)
        summary.append(entry | seed_statistics(members, FIGURES))
    return summary


FIGURES = (
    "best_epoch_test", "val_selected_test", "closure_best_epoch_test", "closure_val_selected_test",
    "agreement", "balanced_agreement", "weight_cos", "picked_confidence", "corpus_confidence",
)  # fmt: skip


def confidence_figures(summary: dict) -> dict:
    """select's label_confidence as two figures that average over seeds: picked_ and corpus_confidence."""
    reported = summary.get("label_confidence") or {}
    return {f"{where}_confidence": value for where, value in reported.items()}


def seed_statistics(members: list[dict], figures: tuple[str, ...]) -> dict:
    """Each figure's mean and std over the seeds that define it, and how many do where any row has it.

    A closure is undefined (NaN, or null once written) where the expert did not beat random.
    """
    entry: dict = {}
    for figure in figures:
        values = [m[figure] for m in members if m.get(figure) is not None and not math.isnan(m[figure])]
        if any(figure in m for m in members):
            entry[figure + "_seeds"] = len(values)
        if values:
            entry[figure] = statistics.fmean(values)
            entry[figure + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return entry


def markdown(summary: list[dict]) -> str:
    lines = [
        "| dataset | scope | k | labels | proj | blocks | select options | train | best-epoch acc | "
        "honest acc | closure best | closure honest | seeds |",
        "|" + "---|" * 13,
    ]

    fmt = format_figure
    for e in summary:
        lines.append(
            f"| {e['dataset']} | {e['scope']} | {e['k']} | {e['labels']} | {e['projection_dim']} | "
            f"{e['grad_blocks']} | {e['select'] or 'default'} | "
            f"{e['train']} | {fmt(e, 'best_epoch_test')} | {fmt(e, 'val_selected_test')} | "
            f"{fmt(e, 'closure_best_epoch_test')} | {fmt(e, 'closure_val_selected_test')} | {e['seeds']} |"
        )
    return "\n".join(lines)


def format_figure(entry: dict, key: str, scale: float = 1, digits: int = 3) -> str:
    """One figure of a summary entry: the mean, ± the std where there are several seeds; "n/a"
    where no seed defines it (a closure where the expert did not beat random), and how many
    seeds do where not all (of `of_seeds`, a table's seed count, where given: a line whose run
    did not reach every seed)."""
    if key not in entry:
        return "n/a" if entry.get(key + "_seeds") == 0 else ""
    text = f"{scale * entry[key]:.{digits}f}"
    if entry["seeds"] > 1:
        text += f" ± {scale * entry[key + '_std']:.{digits}f}"
    defined = entry.get(key + "_seeds", entry["seeds"])
    expected = entry.get("of_seeds", entry["seeds"])
    return text if defined == expected else f"{text} ({defined} of {expected} seeds)"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exit_on_error(main)
