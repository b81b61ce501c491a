"""Does a student that disagrees with the expert flag a failed recovery, without the test split?

quality.py rows measured with --record-proxies hold the student's agreement with the expert's
labels on held-out corpus passages (at the epoch its validation split chose). No rule built on
that figure picks the best strategy (RESULTS.md, "Can the finetuned model choose?"), but its
floor may still mean something: a student that gives those passages the expert's label less
often than chance (1 / the number of labels) has learnt a labelling set against the expert's.
This script splits every such row at chance and reports, on each side, how many rows there are
and their honest closures (how many beat random, the largest), and which regimes fall below.

    python benchmarks/agreement_floor.py benchmarks/results/quality_*.json \
        --out benchmarks/results/agreement_floor_cpu.json

Files without such rows add nothing; a row measured in several files counts once.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from pathlib import Path

from quality import BASELINES, merged_rows, seed_statistics
from weights2data.store import write_json

IDENTITY = ("dataset", "scope", "k", "seed", "train", "select", "grad_blocks", "projection_dim")
FIGURES = ("closure_val_selected_test", "agreement")


def labels_per_dataset(rows: list[dict]) -> dict[str, int]:
    """How many labels each dataset has: the most any of its rows' picks spread over."""
    counts: dict[str, int] = {}
    for row in rows:
        picked = row.get("label_distribution") or {}
        counts[row["dataset"]] = max(counts.get(row["dataset"], 0), len(picked))
    return counts


def student_rows(paths: list[str]) -> list[dict]:
    """Every recovered set's row (no baseline: expert, true rows, random) with an agreement and a
    defined closure, each once, with the number of labels it is measured against and which side
    of chance it falls."""
    everything = [row | {"file": Path(path).name} for path in paths for row in merged_rows([path])]
    labels = labels_per_dataset(everything)
    seen: dict[tuple, dict] = {}
    for row in everything:
        closure = row.get("closure_val_selected_test")
        if row["train"] in BASELINES or "agreement" not in row or closure is None or math.isnan(closure):
            continue
        if not labels.get(row["dataset"]):
            raise SystemExit(f"{row['file']}: no row of {row['dataset']} records its picks' labels")
        key = tuple(row.get(name) for name in IDENTITY) + (row["val_selected_test"], row["agreement"])
        seen.setdefault(
            key,
            {name: row.get(name) for name in IDENTITY}
            | {"file": row["file"], "labels": labels[row["dataset"]]}
            | {figure: row[figure] for figure in FIGURES}
            | {"below_chance": row["agreement"] < 1 / labels[row["dataset"]]},
        )
    return list(seen.values())


def summarise(rows: list[dict]) -> list[dict]:
    """Per side of chance: the rows, their closures (mean ± std, median, largest), how many beat
    random; below chance, also the regimes they come from."""
    summary = []
    for below in (True, False):
        members = [r for r in rows if r["below_chance"] == below]
        closures = sorted(r["closure_val_selected_test"] for r in members)
        # each set is one seed of one setting: what the means and stds average over
        entry = {"side": "below_chance" if below else "at_or_above_chance", "seeds": len(members)}
        if members:
            entry |= seed_statistics(members, FIGURES) | {
                "closure_median": statistics.median(closures),
                "closure_max": closures[-1],
                "above_random": sum(c > 0 for c in closures),
            }
        if below:
            regimes = Counter(f"{r['dataset']} {r['scope']} k={r['k']}" for r in members)
            entry["regimes"] = dict(regimes.most_common())
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="quality.py results files")
    p.add_argument("--out", help="results JSON (written atomically); none: print only")
    args = p.parse_args(argv)
    rows = student_rows(args.files)
    if not rows:
        raise SystemExit("no row records an agreement: measure with quality.py --record-proxies")
    summary = summarise(rows)
    for entry in summary:
        figures = ("closure_val_selected_test", "closure_median", "closure_max")
        closure, median, largest = (entry.get(name, math.nan) for name in figures)
        print(
            f"{entry['side']}: {entry['seeds']} sets, closure {closure:.2f} (median {median:.2f},"
            f" largest {largest:.2f}), {entry.get('above_random', 0)} above random"
        )
    if args.out:
        sources = sorted({r["file"] for r in rows})
        write_json(Path(args.out), {"sources": sources, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
