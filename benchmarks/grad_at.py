"""Where should the gradients be taken? Every `--grad-at` measurement, side by side.

`--grad-at` won in some settings and lost in others (RESULTS.md: the Trainer classifier, word
labels, the letters of the demo, IMDB's and AG News' full finetunes), each measured in its own
run. This script puts them together: for every setting (dataset, expert, regime, k, label words
or letters, gradient blocks, strategy and the other select options) it pairs each seed's row at
the base weights (`grad_at=base`) or at both ends (`grad_at=both`, summed; `both_concat`, the
cosines of the concatenated gradients) with the same seed's row at the finetuned weights, the
default, and reports each point's honest accuracy, its gain over the finetuned weights seed by
seed, and two figures an auditor has without a test split, both at the finetuned weights: the
objective's cosine there (`fit`: how much of the weight change the picks' gradients explain)
and how skewed greedy's picks there are (the total-variation distance of their labels from
uniform, 0 for a balanced set; label skew is the reading RESULTS.md gives for the foreign
experts).

    python benchmarks/grad_at.py benchmarks/results/quality_A.json+benchmarks/results/quality_B.json \
        benchmarks/results/foreign_finetune_cpu.json ... --out benchmarks/results/gradat_cpu.json

A `+` joins quality.py files measured with the same settings (their experts and every row they
share must agree); each argument is one group, named by a `NAME=` before its files (or by its
first file), and a setting is paired only inside its group.
quality.py's closure is against the expert, foreign_finetune.py's against the true rows.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from quality import merged_rows, seed_statistics
from weights2data.config import select_overrides
from weights2data.errors import W2DError
from weights2data.experiment import closure
from weights2data.store import write_json

POINTS = ("finetuned", "base", "both", "both_concat")
SETTING = ("dataset", "expert", "scope", "k", "labels", "seq_len", "grad_blocks", "train", "options")
FIGURES = ("val_selected_test", "closure_val_selected_test", "gain", "fit", "picks_skew")


def options(select: str) -> dict[str, Any]:
    """A row's select options as a dict: quality.py's "a=1 b=2" (select_overrides, which refuses
    what is not a select setting), foreign_finetune.py's w2d flags "--a-b 1"."""
    if select.startswith("--"):
        return {k.replace("-", "_"): v for k, v in re.findall(r"--([\w-]+) (\S+)", select)}
    return select_overrides(select)


def point(chosen: dict[str, Any]) -> str | None:
    """Where a row's gradients were taken, or None for rows this comparison leaves out (a path of
    pseudo-experts, rounds)."""
    if {"pseudo_experts", "rounds"} & chosen.keys():
        return None
    where = chosen.get("grad_at", "finetuned")
    return "both_concat" if where == "both" and chosen.get("path_combine") == "concat" else where


def comparison_row(setting: dict, row: dict, gap_closed: float | None) -> dict:
    """One measured row in this script's terms: its setting, seed, point, honest accuracy and
    closure, and what selection recorded (the picks' labels, the objective's cosine)."""
    chosen = options(row.get("select", ""))
    rest = " ".join(f"{k}={v}" for k, v in sorted(chosen.items()) if k not in ("grad_at", "path_combine"))
    return (
        setting
        | {"options": rest, "seed": row["seed"], "point": point(chosen)}
        | {"val_selected_test": row["val_selected_test"], "closure_val_selected_test": gap_closed}
        | {"label_distribution": row.get("label_distribution"), "objective_cos": row.get("objective_cos")}
    )


def quality_rows(paths: list[str]) -> list[dict]:
    """A group of quality.py files as comparison rows (expert and random rows left out)."""
    merged_rows(paths)  # refuses files that are not quality.py's, or measured with other settings
    args = json.loads(Path(paths[0]).read_text())["args"]
    words = (args.get("verbalizer") or "letters") != "letters"
    labels = ("words" if words else "letters") + (", template" if args.get("template") else "")
    rows = [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]
    experts: dict[tuple, float] = {}
    for row in rows:
        if row["train"] == "expert":
            key = (row["dataset"], row["scope"], row["seed"])
            if experts.setdefault(key, row["val_selected_test"]) != row["val_selected_test"]:
                raise SystemExit(
                    f"{'+'.join(paths)}: the {' '.join(map(str, key))} expert differs between files"
                )
    return [
        comparison_row(
            {"dataset": row["dataset"], "expert": "ours", "scope": row["scope"], "k": row["k"]}
            | {"labels": labels, "seq_len": args.get("seq_len") or 32}
            | {"grad_blocks": row.get("grad_blocks", 0), "train": row["train"]},
            row,
            row.get("closure_val_selected_test"),
        )
        for row in rows
        if row["train"] not in ("expert", "random", "true_k")
    ]


def foreign_rows(path: str) -> list[dict]:
    """foreign_finetune.py's rows (a model finetuned outside weights2data, word labels), with the
    closure it summarises (against the true rows)."""
    data = json.loads(Path(path).read_text())
    truth = {row["seed"]: row["val_selected_test"] for row in data["truth"]}
    randoms = {(r["expert"], r["template"], r["seed"]): r for r in data["rows"] if r["strategy"] == "random"}
    scope = f"top:{data['args']['top_blocks']}"
    out = []
    for row in data["rows"]:
        random = randoms.get((row["expert"], row["template"], row["seed"]))
        if row["strategy"] == "random" or random is None or row["seed"] not in truth:
            continue
        gap_closed = closure(row["val_selected_test"], random["val_selected_test"], truth[row["seed"]])
        setting = {"dataset": data["args"]["dataset"], "expert": row["expert"], "scope": scope, "k": row["k"]}
        setting |= {
            "labels": "words, template" if row["template"] else "words",
            "seq_len": data["args"]["seq_len"],
        }
        setting |= {"grad_blocks": 0}
        out.append(
            comparison_row(
                setting | {"train": row["strategy"]}, row, None if math.isnan(gap_closed) else gap_closed
            )
        )
    return out


def skew(distribution: dict[str, int] | None, labels: int) -> float | None:
    """Total-variation distance of a pick's label counts from uniform over `labels` labels."""
    if not distribution:
        return None
    total = sum(distribution.values())
    shares = [count / total for count in distribution.values()] + [0.0] * (labels - len(distribution))
    return 0.5 * sum(abs(share - 1 / labels) for share in shares)


def compare(rows: list[dict], group: str) -> list[dict]:
    """Each seed's row at each point, with its gain in accuracy over the same setting's row at
    the finetuned weights, that row's objective cosine (`fit`: how much of Δ the picks'
    gradients there explain) and the skew of greedy's picks there; settings measured at one
    point only are left out."""
    rows = [row for row in rows if row["point"] is not None]
    labels = {}
    for row in rows:
        labels[row["dataset"]] = max(labels.get(row["dataset"], 0), len(row["label_distribution"] or {}))
    by_key: dict[tuple, dict] = {}
    for row in rows:
        key = (*(row[f] for f in SETTING), row["seed"], row["point"])
        earlier = by_key.setdefault(key, row)
        if earlier["val_selected_test"] != row["val_selected_test"]:
            raise SystemExit(f"{group}: {' '.join(map(str, key))} measured twice with different results")
    points: dict[tuple, set[str]] = {}
    for *measured, where in by_key:
        points.setdefault(tuple(measured), set()).add(where)
    out = []
    for (*setting, seed, where), row in by_key.items():
        reference = by_key.get((*setting, seed, "finetuned"))
        if reference is None or len(points[(*setting, seed)]) < 2:
            continue
        greedy = tuple("greedy" if f == "train" else v for f, v in zip(SETTING, setting, strict=True))
        greedy_row = by_key.get((*greedy, seed, "finetuned"))
        entry = {"group": group} | dict(zip(SETTING, setting, strict=True)) | {"seed": seed, "point": where}
        entry |= {f: row[f] for f in ("val_selected_test", "closure_val_selected_test")}
        entry["gain"] = row["val_selected_test"] - reference["val_selected_test"]
        entry["fit"] = reference["objective_cos"]
        entry["picks_skew"] = skew(greedy_row and greedy_row["label_distribution"], labels[row["dataset"]])
        out.append(entry)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (group, setting, point) and how many seeds each point beat or fell
    below the finetuned weights in; then each point's tally over the settings of our experts, of
    the foreign ones, and of all."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["group"], *(row[f] for f in SETTING), row["point"]), []).append(row)
    summary = []
    for (group, *setting, where), members in groups.items():
        entry = {"group": group} | dict(zip(SETTING, setting, strict=True)) | {"point": where}
        entry |= {"seeds": len(members)} | seed_statistics(members, FIGURES)
        entry["better"] = sum(m["gain"] > 0 for m in members)
        entry["worse"] = sum(m["gain"] < 0 for m in members)
        summary.append(entry)
    per_setting = list(summary)
    for where in POINTS[1:]:
        for experts in ("ours", "foreign", "all"):
            settings = [
                e for e in per_setting
                if e["point"] == where and experts in ("all", "ours" if e["expert"] == "ours" else "foreign")
            ]  # fmt: skip
            if settings:
                summary.append(tally(settings, where, experts))
    return summary


def tally(settings: list[dict], where: str, experts: str) -> dict:
    """In how many settings a point's mean gain over the finetuned weights was positive or
    negative, and in how many it was so in every seed."""
    return (
        {"group": "all", "experts": experts, "point": where, "settings": len(settings)}
        | {"ahead": sum(e["gain"] > 0 for e in settings), "behind": sum(e["gain"] < 0 for e in settings)}
        | {"ahead_every_seed": sum(e["worse"] == 0 and e["better"] > 0 for e in settings)}
        | {"behind_every_seed": sum(e["better"] == 0 and e["worse"] > 0 for e in settings)}
        | {"median_gain": statistics.median(e["gain"] for e in settings)}
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "groups",
        nargs="+",
        help="[NAME=]FILES: quality.py files joined by + (one group), or a foreign_finetune.py file; "
        "NAME names the group in the results (default: the first file's name)",
    )
    p.add_argument("--out", default=None, help="results JSON (written atomically); none: print only")
    args = p.parse_args(argv)
    rows = []
    for group in args.groups:
        name, _, files = group.rpartition("=")
        paths = files.split("+")
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            p.error(f"no such file: {', '.join(missing)}")
        is_foreign = Path(paths[0]).name.startswith("foreign")
        if is_foreign and len(paths) > 1:
            p.error(f"{group}: a foreign_finetune.py file is a group of its own")
        try:
            found = foreign_rows(paths[0]) if is_foreign else quality_rows(paths)
        except (ValueError, KeyError, TypeError, W2DError) as exc:
            p.error(f"{group}: not a results file of quality.py or foreign_finetune.py ({exc!r})")
        compared = compare(found, name or Path(paths[0]).stem)
        if not compared:
            p.error(f"{group}: no setting measured at the finetuned weights and elsewhere")
        rows += compared
    summary = summarise(rows)
    for e in summary:
        if e["group"] == "all":
            print(
                f"{e['experts']:>7} {e['point']:>12}: ahead in {e['ahead']} of {e['settings']} settings "
                f"({e['ahead_every_seed']} in every seed), behind in {e['behind']} "
                f"({e['behind_every_seed']} in every seed), median gain {e['median_gain'] * 100:+.1f} points"
            )
            continue
        skewed = e.get("picks_skew")
        print(
            f"{e['dataset']:>16} {e['expert']:>7} {e['scope']:>6} {e['k']:>5} {e['labels']:>7} "
            f"{e['train']:>16} {e['options'] or '-':>18} {e['point']:>12}: "
            f"{e['val_selected_test'] * 100:5.1f} ± {e['val_selected_test_std'] * 100:4.1f} "
            f"gain {e['gain'] * 100:+5.1f} ({e['better']}/{e['seeds']} seeds ahead)"
            + ("" if skewed is None else f", greedy's picks at θ1 skewed {skewed:.2f}")
            + ("" if e.get("fit") is None else f", fit at θ1 {e['fit']:.3f}")
        )
    if args.out:
        write_json(args.out, {"sources": args.groups, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
