"""Defences: what each costs the expert (utility) against what it saves (recovery closure).

For each seed, the AG News expert of quality.py (NAME_<train-rows>, --scope, lr by scope, --expert-epochs)
is defended with every method and strength (`w2d defend`, public text = the corpus). For the
undefended expert and each defended one: its own test accuracy (utility); then k documents recovered
from the corpus with greedy from those weights (labels from that model, as an attacker's), the base
model trained on them and on k random corpus documents labelled by the same model, and the gap
closure against the expert row (the base trained on the true rows), honest and best over epochs.

    python benchmarks/defences.py --quick --model tiny-test    # a smoke run, 3 minutes
    python benchmarks/defences.py                              # the measurement: 3 seeds

Results go to benchmarks/results/defences.json (strict JSON, `complete` false until the end,
rewritten after every trained model) and a markdown table on stdout. Experts, defended models and
scores are cached: the same command run again trains only what it has not.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from quality import (
    SMOKE,
    Group,
    HelpFormatter,
    add_common_args,
    add_one_expert_args,
    csv,
    format_figure,
    parse_quick,
    run_seeds,
    score,
    seed_statistics,
)
from weights2data.config import DefenseConfig, SelectConfig
from weights2data.defend import defended_expert
from weights2data.errors import exit_on_error
from weights2data.experiment import as_split, closure
from weights2data.models import LoadedModel
from weights2data.recover import corpus_gradients, recover
from weights2data.store import write_json
from weights2data.train import evaluate

# per method, the strengths measured: around the original's absolute 0.01; up to ten times the update's
# own size; 50 to 200 retrain steps (the expert took 96); head moves from barely (0.01) to costly (1).
# On smollm2-135m's AG News top:4 expert (200 test rows, accuracy 0.855): noise 0.003 costs 1.5 points
# and 0.01 five; relative noise 1 nothing and 3 1.5; head-obfuscate 0.1 half a point and 1 about ten.
DEFENCES = "noise:0.003,0.01,0.03; relative-noise:0.3,1,3,10; retrain:0.5,1,2; head-obfuscate:0.01,0.1,1"
QUICK = SMOKE | dict(
    scope="top:1",
    k=20,
    defences="noise:0.01; relative-noise:1; retrain:0.2; head-obfuscate:0.1",
)


# what a row's defense_stats leaves out of the defence's record: settings and models the row or args give
RECORDED_ELSEWHERE = ("method", "strength", "kl_weight", "seed", "finetuned", "base", "model",
                      "utility", "undefended")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, out="benchmarks/results/defences.json", quick=QUICK)
    add_one_expert_args(p, k_help="documents recovered")
    p.add_argument("--strategy", default="greedy", help="the recovery's selection strategy")
    p.add_argument(
        "--defences",
        default=DEFENCES,
        help="';'-separated METHOD:S1,S2,... (methods: noise, relative-noise, retrain, head-obfuscate)",
    )
    p.set_defaults(seeds="0,1,2", time_budget=100_000)
    return parse_quick(p, QUICK)


def defences(text: str) -> list[DefenseConfig]:
    """'noise:0.01,0.1; retrain:1' -> one DefenseConfig per method and strength."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        method, _, strengths = item.partition(":")
        out += [DefenseConfig(method=method.strip(), strength=s) for s in csv(strengths, float)]
    return out


def main() -> None:
    run_seeds(parse_args(), run_seed, summarise, markdown)


def run_seed(group: Group, args: argparse.Namespace) -> None:
    """The expert row, then recovery from the undefended expert and from each defended one."""
    expert_row = score(group, "expert", group.expert_data.train, {"k": len(group.expert_data.train)})
    undefended = evaluate(group.expert, group.expert_data.test, group.task, group.ev, group.ws.cache)
    recover_from(group, args, group.expert, {"defense": "none", "strength": 0.0}, undefended, expert_row)
    for cfg in defences(args.defences):
        cfg = replace(cfg, seed=group.seed)
        test = group.expert_data.test
        defended, record = defended_expert(
            group.ws, group.base, group.expert, group.corpus, group.task, cfg, test, group.ev
        )
        stats = {k: v for k, v in record.items() if k not in RECORDED_ELSEWHERE}
        extra = {"defense": cfg.method, "strength": cfg.strength, "defense_stats": stats}
        recover_from(group, args, defended, extra, record["utility"], expert_row)


def recover_from(
    group: Group, args: argparse.Namespace, model: LoadedModel, extra: dict, utility: dict, expert_row: dict
) -> None:
    """Greedy and random rows against `model` (labels from it), each with its utility and closure."""
    sel = SelectConfig(k=args.k, strategy="greedy", seed=group.seed)
    t0 = time.time()
    grads = corpus_gradients(
        group.base, model, group.corpus.texts, group.task.label_set, group.data, sel, group.ws.cache
    )
    extra = {**extra, "k": args.k, "utility": utility["accuracy"], "features_s": round(time.time() - t0, 1)}
    texts, labels = group.corpus.texts, group.task.label_set
    random = recover(grads, texts, labels, sel, "random", progress=False)
    rand = score(group, "random", as_split(random), extra)
    recovery = recover(grads, texts, labels, replace(sel, strategy=args.strategy), progress=False)
    row = score(
        group,
        args.strategy,
        as_split(recovery),
        {**extra, "objective_cos": recovery.summary["objective_cos"]},
    )
    for figure in ("best_epoch_test", "val_selected_test"):
        row[f"random_{figure}"] = rand[figure]  # beside it: the docs' table reads both from one row
        row[f"closure_{figure}"] = closure(row[figure], rand[figure], expert_row[figure])
    write_json(args.out, group.out)


FIGURES = (
    "utility",
    "best_epoch_test",
    "val_selected_test",
    "random_best_epoch_test",
    "random_val_selected_test",
    "closure_best_epoch_test",
    "closure_val_selected_test",
)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds for each (defence, strength, training set); the expert row once."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row.get("defense", "-"), row.get("strength", "-"), row["train"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (method, strength, train), members in groups.items():
        entry = {"defense": method, "strength": strength, "train": train, "seeds": len(members)}
        summary.append(entry | seed_statistics(members, FIGURES))
    return summary


def markdown(summary: list[dict]) -> str:
    lines = [
        "| defence | strength | train | utility (defended acc) | best-epoch acc | honest acc | "
        "closure best | closure honest | seeds |",
        "|" + "---|" * 9,
    ]
    fmt = format_figure
    for e in summary:
        lines.append(
            f"| {e['defense']} | {e['strength']} | {e['train']} | {fmt(e, 'utility')} | "
            f"{fmt(e, 'best_epoch_test')} | {fmt(e, 'val_selected_test')} | "
            f"{fmt(e, 'closure_best_epoch_test')} | {fmt(e, 'closure_val_selected_test')} | {e['seeds']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.backends.cuda.matmul.allow_tf32 = True
    exit_on_error(main)
