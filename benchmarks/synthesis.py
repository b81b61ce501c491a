"""Synthesis: SELECT against SELECT + GCG, GCGA, ADMM, and SELECT over the corpus plus generated documents.

For each seed, the AG News expert of quality.py (NAME_<train-rows>, --scope, lr by scope,
--expert-epochs). From its weights: SELECT (greedy) picks k corpus documents; GCG and ADMM refine
those picks, GCGA grows k documents from them one at a time (`w2d run --opt`; with --init random
they start from the random row's passages instead, rows named random+METHOD); SELECT also picks
from the corpus with --generate contrastive documents appended (`w2d run --generate`). Every set is
trained and scored as quality.py's rows are (best-epoch and honest accuracy, closure against k random
corpus documents), beside what it reached on the proxy, cos(ΣG, Δ) after re-tokenisation, the
perplexity of its text under the base model (the tokens the classifier reads), and the seconds it
took (features, selection, synthesis or generation).

    python benchmarks/synthesis.py --quick --model tiny-test    # a smoke run, 2 minutes
    python benchmarks/synthesis.py --k 100 --seeds 0,1,2        # the measurement

Results go to benchmarks/results/synthesis.json (strict JSON, `complete` false until the end,
rewritten after every trained model) and a markdown table on stdout. Experts, scores and finished
syntheses are cached: the same command run again trains and synthesises only what it has not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import fields, replace

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
)
from weights2data.config import EvalConfig, GenerateConfig, SelectConfig, SynthConfig
from weights2data.data import Split, encode_classification
from weights2data.errors import exit_on_error
from weights2data.experiment import as_split, closure
from weights2data.generate import mark_sources, with_generated
from weights2data.recover import (
    Recovery,
    corpus_gradients,
    generated_label_distribution,
    generation_labeller,
    recover,
)
from weights2data.store import write_json
from weights2data.synthesis import synthesise
from weights2data.train import Task, evaluate

QUICK = SMOKE | dict(
    scope="top:1",
    k=20,
    steps=3,
    doc_steps=1,
    inner_steps=3,
    search_width=32,
    generate=64,
)
SYNTH_FLAGS = [f for f in fields(SynthConfig) if f.name not in ("method", "seed", "save_every", "batch_size")]
FIGURES = ("objective_cos", "perplexity_base", "compute_s", "best_epoch_test", "val_selected_test",
           "closure_best_epoch_test", "closure_val_selected_test")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, out="benchmarks/results/synthesis.json", quick=QUICK)
    add_one_expert_args(p, k_help="documents recovered or synthesised")
    p.add_argument("--methods", default="GCG,GCGA,ADMM", help="comma-separated synthesisers")
    p.add_argument(
        "--expert-row",
        choices=("trained", "model"),
        default="trained",
        help="the closure's expert reference: the base trained on the true rows (quality.py's), or the "
        "expert's own test accuracy as both figures (no training: for small CPU runs)",
    )
    p.add_argument(
        "--precondition",
        default="auto",
        help="SELECT's preconditioner, under which the synthesisers maximise the objective too: auto "
        "(adam here, w2d's default) or none (the raw gradients; the first tables in RESULTS.md)",
    )
    p.add_argument(
        "--generate",
        type=int,
        default=1000,
        help="contrastive documents appended to the corpus for the SELECT+generated row (0: no such row)",
    )
    p.add_argument(
        "--generate-per-label",
        action="store_true",
        help="generate in equal shares per label of the expert (by rejection; w2d's --generate-per-label); "
        "the row is then SELECT+generated per label",
    )
    for f in SYNTH_FLAGS:
        kind = {"int": int, "float": float}.get(f.type, str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["help"])
    p.set_defaults(time_budget=100_000)
    return parse_quick(p, QUICK)


def main() -> None:
    run_seeds(parse_args(), run_seed, summarise, markdown)


def run_seed(group: Group, args: argparse.Namespace) -> None:
    """The expert and random rows, SELECT, each synthesiser from SELECT's picks, SELECT over corpus +
    generated; every row with its closure against this seed's random and expert rows."""
    expert_row = expert_reference(group, args.expert_row)
    sel = SelectConfig(k=args.k, strategy="greedy", seed=group.seed, precondition=args.precondition)
    texts, labels, cache = group.corpus.texts, group.task.label_set, group.ws.cache
    t0 = time.time()
    grads = corpus_gradients(group.base, group.expert, texts, labels, group.data, sel, cache)
    features_s = time.time() - t0
    random = recover(grads, texts, labels, replace(sel, strategy="random"), progress=False)
    rand = score(group, "random", as_split(random), arm(group, random, 0.0))
    picks = recover(grads, texts, labels, sel, progress=False)
    rows = [
        score(group, "SELECT", as_split(picks), arm(group, picks, features_s + picks.summary["select_s"]))
    ]
    start, start_name = (random, "random") if args.init == "random" else (picks, "SELECT")
    for method in csv(args.methods):
        cfg = SynthConfig(
            method=method, seed=group.seed, **{f.name: getattr(args, f.name) for f in SYNTH_FLAGS}
        )
        made = synthesise(group.base, group.expert, start, group.task, cfg, cache, metric=grads.metric)
        spent = features_s + start.summary["select_s"] + made.summary["synth_s"]
        extra = {**arm(group, made, spent), "synthesised": made.summary["synthesised"]}
        rows.append(score(group, f"{start_name}+{method}", as_split(made), extra))
    if args.generate:
        t0 = time.time()
        gen = GenerateConfig(docs=args.generate, seed=group.seed, per_label=args.generate_per_label)
        labeller = generation_labeller(group.base, group.expert, labels, group.data)
        pool, sources = with_generated(
            group.corpus, group.base, group.expert, gen, group.task.seq_len, cache, labeller
        )
        pool_grads = corpus_gradients(group.base, group.expert, pool.texts, labels, group.data, sel, cache)
        generated_labels = generated_label_distribution(pool_grads, sources, labels)
        mixed = mark_sources(
            recover(pool_grads, pool.texts, labels, sel, progress=False), sources, generated_labels
        )
        extra = {
            **arm(group, mixed, features_s + time.time() - t0),
            "generated_picks": mixed.summary["generated_picks"],
            "generated_labels": mixed.summary.get("generated_labels"),
        }
        name = "SELECT+generated per label" if gen.per_label else "SELECT+generated"
        rows.append(score(group, name, as_split(mixed), extra))
    for row in rows:
        for figure in ("best_epoch_test", "val_selected_test"):
            row[f"closure_{figure}"] = closure(row[figure], rand[figure], expert_row[figure])
    write_json(args.out, group.out)


def expert_reference(group: Group, kind: str) -> dict:
    """The expert row: trained as quality.py trains it, or the expert model's own test accuracy."""
    if kind == "trained":
        return score(group, "expert", group.expert_data.train, {"k": len(group.expert_data.train)})
    accuracy = evaluate(group.expert, group.expert_data.test, group.task, group.ev, group.ws.cache)[
        "accuracy"
    ]
    row = {"dataset": group.dataset, "scope": group.scope, "seed": group.seed, "train": "expert (model)"}
    row |= {"k": len(group.expert_data.train), "best_epoch_test": accuracy, "val_selected_test": accuracy}
    group.out["rows"].append(row)
    return row


def arm(group: Group, recovery: Recovery, compute_s: float) -> dict:
    """What a training set's row records besides its scores."""
    return {
        "k": len(recovery.texts),
        "objective_cos": recovery.summary["objective_cos"],
        "perplexity_base": base_perplexity(group, recovery.texts),
        "compute_s": round(compute_s, 1),
        "label_distribution": recovery.summary.get("label_distribution"),
        "label_confidence": recovery.summary.get("label_confidence"),  # absent where texts were rewritten
    }


def base_perplexity(group: Group, texts: list[str]) -> float:
    """The base model's perplexity on the tokens the classifier reads of each text (its last seq_len − 1)."""
    tokenizer = group.base.tokenizer
    encoded = encode_classification(tokenizer, texts, group.task.seq_len)
    read = [
        tokenizer.decode(ids[mask.bool()].tolist())
        for ids, mask in zip(encoded.input_ids, encoded.attention_mask, strict=True)
    ]
    ev = EvalConfig(max_eval_rows=len(texts), eval_batch_size=group.ev.eval_batch_size)
    lm = Task("lm", group.task.seq_len)
    return evaluate(group.base, Split(read, None), lm, ev, group.ws.cache)["perplexity"]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds for each training set."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["train"], []).append(row)
    summary = []
    for train, members in groups.items():
        entry = {"train": train, "seeds": len(members)}
        for figure in FIGURES:
            values = [m[figure] for m in members if isinstance(m.get(figure), float | int)]
            values = [v for v in values if v == v]  # NaN: an undefined closure
            if any(figure in m for m in members):
                entry[figure + "_seeds"] = len(values)
            if values:
                entry[figure] = statistics.fmean(values)
                entry[figure + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(summary: list[dict]) -> str:
    lines = [
        "| train | cos(ΣG, Δ) | base ppl | compute s | best-epoch acc | honest acc | closure best | "
        "closure honest | seeds |",
        "|" + "---|" * 9,
    ]
    for e in summary:
        cells = [
            format_figure(e, f, digits=1 if f in ("perplexity_base", "compute_s") else 3) for f in FIGURES
        ]
        lines.append(f"| {e['train']} | " + " | ".join(cells) + f" | {e['seeds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.backends.cuda.matmul.allow_tf32 = True
    exit_on_error(main)
