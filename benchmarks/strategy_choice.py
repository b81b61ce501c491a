"""Can the finetuned model itself choose the recovery strategy, without the test set?

No strategy wins in every regime (greedy on sentiment labels, balanced greedy in a pool on topic
labels, top-k balanced in some full finetunes), and an auditor has no test split to tell which
one won. What they do have is the finetuned model: train the base model on each candidate's
documents and keep the one whose student is most like it. This script replays that choice on
quality.py results measured with --record-proxies (each row then holds, at the epoch its
validation split chose, the student's agreement with the expert's labels on held-out corpus
passages and the cosine between the student's weight change and the expert's) and scores it
against every candidate kept fixed, per dataset and regime:

    python benchmarks/quality.py ... --record-proxies \
        --strategies random,greedy,greedy_balanced,topk_balanced \
        --select-options "precondition=auto; pool=2; precondition=kfac" \
        --out benchmarks/results/quality_X.json
    python benchmarks/strategy_choice.py benchmarks/results/quality_X.json ... \
        --out benchmarks/results/choice_strategy_cpu.json

Rules: each candidate alone; `by_agreement` (the candidate whose student gives the most held-out
passages the expert's label); `by_balanced_agreement` (the same share averaged over the expert's
labels, so copying the expert's commonest label on the corpus gains nothing); `by_weight_change`
(the largest cos(θs − θ0, θ1 − θ0)); `by_weight_change_above_chance` (the same among the
candidates whose students agree at least as often as chance, 1 / labels); and `oracle`, the
candidate with the best test accuracy, which reads the test split and only bounds what any
choice could reach. Each rule's summary also counts, seed by seed, how often its test accuracy
beat, tied or fell below greedy's.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from agreement_floor import labels_per_dataset
from quality import seed_statistics
from weights2data.store import write_json

# the candidates, each a quality.py row's `train@select`: the settings the README tells users to
# run beside each other (the default, top-k balanced, balanced greedy in a pool, balanced greedy
# on whitened gradients)
CANDIDATES = {
    "greedy": "greedy@precondition=auto",
    "topk_balanced": "topk_balanced@precondition=auto",
    "pool_balanced": "greedy_balanced@pool=2",
    "kfac_balanced": "greedy_balanced@precondition=kfac",
    "kfac_topk": "topk_balanced@precondition=kfac",  # measured later, on fewer regimes: opt-in
    # top-k balanced's default line spelled out (a named strategy's `auto` is Adam): opt-in
    "adam_topk": "topk_balanced@precondition=adam",
}
DEFAULT_CANDIDATES = ("greedy", "topk_balanced", "pool_balanced", "kfac_balanced")
CHOOSERS = {  # rule → the figure it maximises over the candidates
    "by_agreement": "agreement",
    "by_balanced_agreement": "balanced_agreement",
    "by_weight_change": "weight_cos",
    "oracle": "val_selected_test",
}
# the largest weight-change cosine among the candidates whose students agree with the expert at
# least as often as chance (all of them if none does): below chance a set has not recovered the
# expert's data in any measurement (agreement_floor.py)
FLOORED = "by_weight_change_above_chance"
FIGURES = ("val_selected_test", "closure_val_selected_test")


def chance(by_name: dict[str, dict], dataset: str) -> float:
    """1 / the number of labels, read from the candidates' picks."""
    labels = labels_per_dataset(list(by_name.values())).get(dataset, 0)
    if not labels:
        raise SystemExit(f"{dataset}: no candidate records its picks' labels")
    return 1 / labels


def candidate_rows(rows: list[dict], candidates: Sequence[str]) -> dict[tuple, dict[str, dict]]:
    """(dataset, scope, k, seed) → candidate → its row, for every candidate measured there. A
    candidate measured twice must have scored the same: files measured with other settings
    (another expert, test split or epochs) cannot be replayed together."""
    names = {CANDIDATES[name]: name for name in candidates}
    found: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        name = names.get(f"{row['train']}@{row.get('select', '')}")
        if name is None:
            continue
        key = (row["dataset"], row["scope"], row["k"], row["seed"])
        earlier = found.setdefault(key, {}).setdefault(name, row)
        if earlier["val_selected_test"] != row["val_selected_test"]:
            raise SystemExit(f"{' '.join(map(str, key))}: {name} measured twice with different results")
    return found


def choices(rows: list[dict], candidates: Sequence[str] = DEFAULT_CANDIDATES) -> list[dict]:
    """One row per (dataset, scope, k, seed, rule): what the rule chose among `candidates` and
    how it scored."""
    out = []
    for (dataset, scope, k, seed), by_name in sorted(candidate_rows(rows, candidates).items()):
        missing = [name for name in candidates if name not in by_name]
        if missing:
            raise SystemExit(f"{dataset} {scope} seed {seed}: no row for {', '.join(missing)}")
        if any("weight_cos" not in row for row in by_name.values()):
            raise SystemExit(f"{dataset} {scope} seed {seed}: measured without --record-proxies")
        rules = {name: name for name in candidates}
        for rule, figure in CHOOSERS.items():
            rules[rule] = max(candidates, key=lambda name: by_name[name][figure])  # ties: the first
        floor = chance(by_name, dataset)
        agreeing = [name for name in candidates if by_name[name]["agreement"] >= floor]
        rules[FLOORED] = max(agreeing or candidates, key=lambda name: by_name[name]["weight_cos"])
        for rule, name in rules.items():
            row = by_name[name]
            out.append(
                {"dataset": dataset, "scope": scope, "k": k, "seed": seed, "rule": rule, "chose": name}
                | {figure: row[figure] for figure in FIGURES}
            )
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds of each rule's figures, per (dataset, scope, k), how often each
    candidate was chosen and, seed by seed, how the rule's test accuracy compares with the
    default's (greedy); then each rule over every regime at once."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["scope"], row["k"], row["rule"]), []).append(row)
    for row in rows:  # after every regime's groups: the overall line comes last
        groups.setdefault(("all", "all", "all", row["rule"]), []).append(row)
    default = {(r["dataset"], r["scope"], r["k"], r["seed"]): r for r in rows if r["rule"] == "greedy"}
    summary = []
    for (dataset, scope, k, rule), members in groups.items():
        chosen = dict(Counter(m["chose"] for m in members))
        entry = {"dataset": dataset, "scope": scope, "k": k, "rule": rule, "seeds": len(members)}
        entry |= {"chosen": chosen} | seed_statistics(members, FIGURES)
        pairs = [(m, default.get((m["dataset"], m["scope"], m["k"], m["seed"]))) for m in members]
        gains = [m["val_selected_test"] - d["val_selected_test"] for m, d in pairs if d is not None]
        if gains:
            entry["against_greedy"] = {
                "better": sum(g > 0 for g in gains),
                "tied": sum(g == 0 for g in gains),
                "worse": sum(g < 0 for g in gains),
                "largest_loss": max(0.0, -min(gains)),
            }
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="quality.py results files measured with --record-proxies")
    p.add_argument(
        "--candidates",
        default=",".join(DEFAULT_CANDIDATES),
        help=f"comma-separated, among {', '.join(f'{k} ({v})' for k, v in CANDIDATES.items())}",
    )
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated: replay only these datasets' regimes (default: every one in the files)",
    )
    p.add_argument("--out", default=None, help="results JSON (written atomically); none: print only")
    args = p.parse_args(argv)
    candidates = [name.strip() for name in args.candidates.split(",")]
    unknown = [name for name in candidates if name not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate(s) {', '.join(unknown)}: choose from {', '.join(CANDIDATES)}")
    rows = [row for path in args.files for row in json.loads(Path(path).read_text())["rows"]]
    datasets = None if args.datasets is None else [d.strip() for d in args.datasets.split(",")]
    if datasets is not None:
        absent = sorted(set(datasets) - {row["dataset"] for row in rows})
        if absent:
            p.error(f"no rows for dataset(s) {', '.join(absent)} in the files")
        rows = [row for row in rows if row["dataset"] in datasets]
    chosen = choices(rows, candidates)
    summary = summarise(chosen)
    for entry in summary:
        print(
            f"{entry['dataset']:>16} {entry['scope']:>6} {entry['rule']:>22}: "
            f"{entry['val_selected_test'] * 100:5.1f} ± {entry['val_selected_test_std'] * 100:4.1f}  "
            f"closure {entry.get('closure_val_selected_test', float('nan')):5.2f}  {entry['chosen']}"
        )
    if args.out:
        sources = [str(Path(path)) for path in args.files]
        out = {"sources": sources, "candidates": candidates, "rows": chosen, "summary": summary}
        out |= {} if datasets is None else {"datasets": datasets}
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
