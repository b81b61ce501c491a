"""Every figure table in the docs, recomputed from the results files it quotes.

README.md and benchmarks/RESULTS.md quote benchmarks/results/*.json. A generated table sits
between two HTML comments naming its source; its header row and separator are written by hand,
its body rows and the source line under them are generated:

    <!-- table quality files=a.json+b.json rows=dataset,k columns=expert,greedy,random closure=greedy -->
    | dataset | k | expert | greedy (SELECT) | random | greedy closure |
    | --- | ---: | --- | --- | --- | --- |
    | AG News | 1000 | 83.0 ± 0.5 | 81.2 ± 0.3 | 78.1 ± 3.0 | 0.54 ± 0.30 |

    *Source: `benchmarks/results/a.json`, ... (complete runs).*
    <!-- /table -->

Table kinds (the word after "table"), each with KEY=VALUE settings:
  quality  quality.py results: summarise(merged_rows(...)) of each group of `files` ("+" merges
           files measured with the same settings, "," separates groups); a row per distinct
           value of the `rows` fields, a column per training set in `columns` and a closure
           column per strategy in `closure`; `figure` honest (default), best, honest/best or
           best/honest (`closure_figure` likewise, default: `figure`); accuracy in %, mean ± std
           over seeds. Every training set the files
           measured must be a column, or be filtered out (train=...).
  pivot    the list at `path` in `file`: a row per distinct value of the `rows` fields, a column
           per value of the field `by` listed in `columns`, each cell the expression `value`
           (a column written VALUE@EXPRESSION uses its own).
  rows     a row per element of the lists (or the object) at each of the comma-separated
           `path`s in `file` (a path ending in a KEY=VALUE selector: every element it matches);
           `columns` are expressions.
Any other KEY=V1,V2 of quality and pivot keeps the entries whose field KEY is one of the values
(a summary's "-", "does not apply", always passes). Flags: `partial` quotes a file with
`complete: false` knowingly; `pending` leaves the text unchecked (with a warning) while the file
is not committed yet.

An expression is PATH[*SCALE][:FORMAT][±], several joined by "/" (shown as "a / b"). PATH is
dotted keys, list indices and KEY=VALUE&KEY=VALUE selectors (the one list element with those
fields); keys and values are percent-decoded, so `%2F` stands for "/", `%2E` for "." and `%20`
for a space (generated_labels.Sci%2FTech, select=pool=1%2E5); FORMAT a Python format spec such
as .1f or ,d; ± adds a summary entry's std over seeds.
A figure in prose: <!-- value FILE EXPRESSION [partial|pending] -->199<!-- /value -->.

    python benchmarks/check_results.py          # `make results`: exit 1 naming each figure that differs
    python benchmarks/check_results.py --write  # regenerate the marked text (and stale stored summaries)

Every results file is checked too: strict JSON (NaN or Infinity must be null), and a stored
`summary` equal to summarise(rows) (quality.py's, leakage.py's, defences.py's, synthesis.py's,
strategy_choice.py's, lm_recovery.py --summarise's or foreign_finetune.py's, which also reads
the true rows' scores).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import agreement_floor
import defences
import foreign_finetune
import grad_at
import leakage
import lm_recovery
import quality
import strategy_choice
import synthesis
from weights2data.store import write_json

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "benchmarks" / "RESULTS.md")
RESULTS = REPO / "benchmarks" / "results"
SHOWN_AS = "benchmarks/results/"  # how a source line names the results folder

MARKER = re.compile(r"<!-- (table|value) (.*?) -->(.*?)<!-- /\1 -->", re.S)
TERM = re.compile(r"(?P<path>.+?)(?:\*(?P<scale>[\d.]+))?(?::(?P<format>,?(?:\.\d+)?[fd]))?(?P<pm>±)?")
FIGURES = {"honest": "val_selected_test", "best": "best_epoch_test"}
SUMMARISERS = {  # by the file name's first word: the stored summary from the whole file
    "quality": lambda data: quality.summarise(data["rows"]),
    "leakage": lambda data: leakage.summarise(data["rows"]),
    "defences": lambda data: defences.summarise(data["rows"]),
    "foreign": foreign_finetune.summarise,
    "synthesis": lambda data: synthesis.summarise(data["rows"]),
    "choice": lambda data: strategy_choice.summarise(data["rows"]),
    "gradat": lambda data: grad_at.summarise(data["rows"]),
    "agreement": lambda data: agreement_floor.summarise(data["rows"]),
    "lm": lambda data: lm_recovery.summarise(data["rows"]),
}
FLAGS = {"partial", "pending"}
NAMES = {  # how a value in the JSON reads in the docs
    "ag_news": "AG News",
    "ag_news2": "AG News, Business and Sci/Tech",
    "ag_news3": "AG News, 3 classes",
    "imdb": "IMDB",
    "newsgroup": "20 Newsgroups",
    "newsgroup3": "20 Newsgroups, 3 subjects",
    "newsgroup5": "20 Newsgroups, 5 subjects",
    "newsgroup6": "20 Newsgroups, 6 subjects",
    "newsgroup10": "20 Newsgroups, 10 groups",
    "rotten_tomatoes": "Rotten Tomatoes",
    "greedy": "greedy (SELECT)",
    "auto": "auto (the default)",
    "topk": "top-k",
    "greedy_balanced": "greedy balanced",
    "greedy_balanced@precondition=kfac": "greedy balanced, whitened",
    "topk_balanced": "top-k balanced",
    "topk_balanced@precondition=kfac": "top-k balanced, whitened",
    "loss_drop": "loss drop",
    "loss_drop_balanced": "loss drop balanced",
    "loss_drop@loss_drop_per=document": "loss drop, summed per document",
    "random_confident": "random (kept share)",
    "oracle": "ceiling: the passages nearest the true texts",
    "below_chance": "below chance",
    "at_or_above_chance": "at or above chance",
}


class SpecError(Exception):
    """A marker that cannot be regenerated as written; reported like a differing figure."""


@dataclass
class Table:
    rows: list[list[str]]
    keys: int  # the leading cells that name a row
    data: dict[str, Any]  # the results files it comes from, by name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the marked text from the JSON instead")
    args = p.parse_args()
    problems = check(list(DOCS), RESULTS, args.write)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"\n{len(problems)} problem(s); `check_results.py --write` regenerates the marked text")
        return 1
    done = "rewritten from" if args.write else "matches"
    print(f"every marked figure in {', '.join(d.name for d in DOCS)} {done} benchmarks/results/")
    return 0


def check(docs: list[Path], folder: Path, write: bool = False) -> list[str]:
    """Problems with the results files, then with each doc's marked figures (rewritten with `write`)."""
    problems = check_files(folder, write)
    for doc in docs:
        problems += check_doc(doc, folder, write)
    return problems


# ---------------------------------------------------------------- results files


def strict_json(path: Path) -> Any:
    def reject(name: str) -> None:
        raise ValueError(f"bare {name}, which is not JSON (write null)")

    return json.loads(path.read_text(), parse_constant=reject)


def complete(data: Any) -> bool:
    """quality.py, leakage.py and defences.py record `complete`; the others write once, at the end."""
    return not isinstance(data, dict) or data.get("complete", True) is True


def check_files(folder: Path, write: bool) -> list[str]:
    problems = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = strict_json(path)
        except ValueError as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        summarise = SUMMARISERS.get(path.name.split("_")[0])
        if summarise is None or not {"rows", "summary"} <= data.keys():
            continue
        expected = summarise(data)
        difference = first_difference(data["summary"], expected, "summary")
        if difference and write:
            write_json(path, data | {"summary": expected})
        elif difference:
            problems.append(f"{path.name}: the stored summary differs from summarise(rows) at {difference}")
    return problems


def first_difference(stored: Any, recomputed: Any, at: str) -> str | None:
    """Where two JSON values first differ (numbers to 1e-9 relative), or None."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        for key in sorted(stored.keys() | recomputed.keys()):
            if key not in stored or key not in recomputed:
                a, b = stored.get(key, "absent"), recomputed.get(key, "absent")
                return f"{at}.{key} (stored: {a}, recomputed: {b})"
            found = first_difference(stored[key], recomputed[key], f"{at}.{key}")
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return f"{at} ({len(stored)} entries stored, {len(recomputed)} recomputed)"
        pairs = enumerate(zip(stored, recomputed, strict=True))
        return next((f for i, (a, b) in pairs if (f := first_difference(a, b, f"{at}.{i}"))), None)
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (stored, recomputed))
    if numbers and math.isclose(stored, recomputed, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return None if stored == recomputed else f"{at} (stored: {stored!r}, recomputed: {recomputed!r})"


# ---------------------------------------------------------------- docs


def check_doc(doc: Path, folder: Path, write: bool) -> list[str]:
    text = doc.read_text()
    problems: list[str] = []

    def redo(match: re.Match) -> str:
        kind, spec, old = match.groups()
        line = text.count("\n", 0, match.start()) + 1
        where = f"{doc.name}:{line} ({heading(text[: match.start()].splitlines())}), {kind} {spec.split()[0]}"
        try:
            regenerated = regenerate(kind, spec, old, folder)
        except SpecError as exc:
            problems.append(f"{where}: {exc}")
            return match.group(0)
        if regenerated is None:
            print(f"{where}: not checked: its results file is pending (not committed yet)", file=sys.stderr)
            return match.group(0)
        new, keys = regenerated
        if not write and new != old:
            problems.extend(f"{where}: {p}" for p in differences(old, new, keys))
        return f"<!-- {kind} {spec} -->{new}<!-- /{kind} -->"

    updated = MARKER.sub(redo, text)
    if write and updated != text:
        doc.write_text(updated)
    return problems


def heading(lines: list[str]) -> str:
    """The last markdown heading among `lines`, outside code blocks."""
    found, code = "top", False
    for line in lines:
        code ^= line.startswith("```")
        if not code and line.startswith("#"):
            found = line.lstrip("# ")
    return found


def regenerate(kind: str, spec: str, old: str, folder: Path) -> tuple[str, int] | None:
    """The text the marker's JSON gives and how many leading cells name a table row (0: a value);
    None while a `pending` file is missing."""
    words = spec.split()
    try:
        if kind == "value":
            name, expression, *flags = words
            data = sources([name], set(flags), folder)
            return None if data is None else (render(data[name], expression), 0)
        settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        flags = {w for w in words[1:] if "=" not in w}
        builder = {"quality": quality_table, "pivot": pivot_table, "rows": rows_table}.get(words[0])
        if builder is None:
            raise SpecError(f"unknown table kind '{words[0]}' (quality, pivot or rows)")
        table = builder(settings, flags, folder)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SpecError(f"cannot read '{spec}': {exc!r}") from exc
    return None if table is None else (table_text(old, table), table.keys)


def sources(names: list[str], flags: set[str], folder: Path) -> dict[str, Any] | None:
    """The named results files, strictly parsed; None while a `pending` one is not committed."""
    if flags - FLAGS:
        raise SpecError(f"unknown flag(s) {', '.join(sorted(flags - FLAGS))} ({', '.join(sorted(FLAGS))})")
    missing = [n for n in names if not (folder / n).exists()]
    if missing and "pending" in flags:
        return None
    if missing:
        raise SpecError(f"no results file {', '.join(missing)} (mark it `pending` until it is committed)")
    data = {n: strict_json(folder / n) for n in names}
    incomplete = [n for n, d in data.items() if not complete(d)]
    if incomplete and "partial" not in flags:
        raise SpecError(f"{', '.join(incomplete)} is an incomplete run (complete: false); mark it `partial`")
    if "partial" in flags and not incomplete:
        raise SpecError("marked `partial`, but every file it quotes is complete")
    return data


def quality_table(settings: dict[str, str], flags: set[str], folder: Path) -> Table | None:
    groups = [group.split("+") for group in settings.pop("files").split(",")]
    data = sources([name for group in groups for name in group], flags, folder)
    if data is None:
        return None
    figure = settings.pop("figure", "honest")
    figures = [FIGURES[f] for f in figure.split("/")]
    closures = [FIGURES[f] for f in settings.pop("closure_figure", figure).split("/")]
    columns = [(t, "/".join(f"{f}*100:.1f±" for f in figures)) for t in settings.pop("columns").split(",")]
    closure = settings.pop("closure", "")
    columns += [(t, "/".join(f"closure_{f}:.2f±" for f in closures)) for t in closure.split(",") if t]
    keys = settings.pop("rows").split(",")
    try:
        summaries = [quality.summarise(quality.merged_rows([str(folder / n) for n in g])) for g in groups]
    except SystemExit as exc:  # merged_rows refuses files measured with different settings
        raise SpecError(str(exc)) from exc
    for entries in summaries:  # a line measured on fewer seeds than the rest says so
        most = max(e["seeds"] for e in entries)
        for entry in entries:
            entry["of_seeds"] = most
    return Table(pivot(summaries, keys, "train", columns, settings), len(keys), data)


def pivot_table(settings: dict[str, str], flags: set[str], folder: Path) -> Table | None:
    name = settings.pop("file")
    data = sources([name], flags, folder)
    if data is None:
        return None
    entries, keys = lookup(data[name], settings.pop("path")), settings.pop("rows").split(",")
    by = settings.pop("by")
    value = settings.pop("value")
    columns = [
        (v.partition("@")[0], v.partition("@")[2] or value) for v in settings.pop("columns").split(",")
    ]
    return Table(pivot([entries], keys, by, columns, settings), len(keys), data)


def rows_table(settings: dict[str, str], flags: set[str], folder: Path) -> Table | None:
    name, paths, columns = settings.pop("file"), settings.pop("path"), settings.pop("columns")
    if settings:
        raise SpecError(f"unknown setting(s) {', '.join(settings)}")
    data = sources([name], flags, folder)
    if data is None:
        return None
    items = []
    for path in paths.split(","):
        parent, _, last = path.rpartition(".")
        if "=" in last:  # a closing selector keeps every element it matches, in file order
            items += matching(lookup(data[name], parent), last)
            continue
        found = lookup(data[name], path)
        items += found if isinstance(found, list) else [found]
    return Table([[render(item, c) for c in columns.split(",")] for item in items], 1, data)


def pivot(
    groups: list[list[dict]], keys: list[str], by: str, columns: list[tuple[str, str]], filters: dict
) -> list[list[str]]:
    """A row per distinct `keys` values in each group; a cell per (value of `by`, expression)."""
    rows = []
    for entries in groups:
        unknown = [f for f in filters if not any(f in e for e in entries)]
        if unknown:
            raise SpecError(f"unknown setting or field(s) {', '.join(unknown)}")
        entries = [e for e in entries if all(passes(e.get(f), v) for f, v in filters.items())]
        left_out = sorted({str(e[by]) for e in entries} - {value for value, _ in columns} - {"-"})
        if left_out:
            raise SpecError(f"leaves out the measured {by} {', '.join(left_out)}: add it, or filter {by}=")
        for key in dict.fromkeys(tuple(e.get(k) for k in keys) for e in entries):
            if "-" in key:
                continue
            fits = [e for e in entries if all(e.get(k) in (v, "-") for k, v in zip(keys, key, strict=True))]
            cells = [show(k, v) for k, v in zip(keys, key, strict=True)]
            rows.append(cells + [render(one(fits, by, value, key), expr) for value, expr in columns])
    if not rows:
        raise SpecError("the files give no rows")
    return rows


def passes(value: Any, allowed: str) -> bool:
    """A filter: "-" (a summary's "does not apply") always passes."""
    return value == "-" or str(value) in allowed.split(",")


def one(entries: list[dict], by: str, value: str, key: tuple) -> dict | None:
    found = [e for e in entries if str(e[by]) == value]
    if len(found) > 1:
        raise SpecError(f"{len(found)} entries with {by} = {value} in row {key}: add a row field or a filter")
    return found[0] if found else None


def lookup(obj: Any, path: str) -> Any:
    """The value at a dotted path: keys (percent-decoded), list indices, KEY=VALUE&... selectors
    (one list element)."""
    for part in path.split(".") if path else []:
        if "=" in part:
            found = matching(obj, part)
            if len(found) != 1:
                raise SpecError(f"{len(found)} elements match {part}, not one")
            obj = found[0]
        else:
            obj = obj[int(part)] if isinstance(obj, list) else obj[unquote(part)]
    return obj


def matching(entries: list[dict], selector: str) -> list[dict]:
    """The elements whose fields equal every KEY=VALUE of `selector` (joined by &); a number
    matches by value, so strength=10 selects 10.0 (a dot would split the path), and a value is
    percent-decoded, so select=--grad-at%20base selects a value holding a space."""
    wanted = {key: unquote(value) for key, value in (pair.split("=", 1) for pair in selector.split("&"))}
    return [e for e in entries if all(same_value(e.get(k), v) for k, v in wanted.items())]


def same_value(value: Any, text: str) -> bool:
    if str(value) == text:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return float(text) == value
    except ValueError:
        return False


def render(obj: Any, expression: str) -> str:
    """The text of an expression's terms, joined by " / "; empty where none applies."""
    if obj is None:
        return ""
    texts = [term(obj, t) for t in expression.split("/")]
    return " / ".join(texts) if any(texts) else ""


def term(obj: Any, text: str) -> str:
    match = TERM.fullmatch(text)
    if match is None:
        raise SpecError(f"'{text}' is not PATH[*SCALE][:FORMAT][±]")
    parent_path, _, key = match["path"].rpartition(".")
    parent = lookup(obj, parent_path)
    name = unquote(key)
    if isinstance(parent, dict) and name not in parent:  # "n/a": no seed defines it
        return "n/a" if parent.get(name + "_seeds") == 0 else ""
    value, scale, form = lookup(parent, key), float(match["scale"] or 1), match["format"]
    if value is None:
        return "n/a"
    if match["pm"]:
        return minus(quality.format_figure(parent, key, scale, int(form.strip(".f"))))
    if not form:
        return show(key, value)
    return minus(format(round(value * scale) if form.endswith("d") else value * scale, form))


def show(key: str, value: Any) -> str:
    if key == "grad_blocks" and isinstance(value, int):
        return "head" if value == 0 else "every changed block" if value < 0 else f"head + {value} blocks"
    if key == "projection_dim" and value == 0:
        return "exact"
    if key == "select" and value == "":
        return "default"
    if key == "template" and isinstance(value, bool):
        return "template" if value else "plain"
    return NAMES.get(value, str(value)) if isinstance(value, str) else str(value)


def minus(text: str) -> str:
    return text.replace("-", "−")  # the typographic minus, as the docs write it


def table_text(old: str, table: Table) -> str:
    header, _, _ = split_block(old)
    width = len(cells(header[0]))
    if width != len(table.rows[0]):
        raise SpecError(f"the header has {width} columns; the marker gives {len(table.rows[0])}")
    body = ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n" + "\n".join([*header, *body]) + "\n\n" + source_line(table.data) + "\n"


def source_line(data: dict[str, Any]) -> str:
    """Where a table's figures come from, and whether each run was complete."""
    names = [f"`{SHOWN_AS}{name}`" for name in data]
    if all(complete(d) for d in data.values()):
        return f"*Source: {', '.join(names)} ({'complete runs' if len(data) > 1 else 'a complete run'}).*"
    status = [
        " (complete)" if complete(d) else " (an incomplete run: `complete: false`)" for d in data.values()
    ]
    return f"*Source: {', '.join(n + s for n, s in zip(names, status, strict=True))}.*"


def split_block(text: str) -> tuple[list[str], list[list[str]], str]:
    """(header and separator lines, body rows as cells, the rest) of a marked table."""
    lines = text.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    if len(table) < 2:
        raise SpecError("write the table's header row and separator by hand, then --write fills it")
    rest = " ".join(line for line in lines if line.strip() and not line.startswith("|"))
    return table[:2], [cells(line) for line in table[2:]], rest


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def differences(old: str, new: str, keys: int) -> list[str]:
    """What the text says against what the JSON gives, cell by cell (`keys` cells name a row)."""
    if keys == 0:
        return [f"the text says '{old}', the JSON gives '{new}'"]
    header, said_rows, said_source = split_block(old)
    _, rows, source = split_block(new)
    names, said, out = cells(header[0]), {}, []
    for row in said_rows:
        said.setdefault(" | ".join(row[:keys]), row)
    for row in rows:
        name = " | ".join(row[:keys])
        text_row = said.pop(name, None)
        if text_row is None:
            out.append(f"row '{name}' is missing; the JSON gives | {' | '.join(row)} |")
            continue
        out += [
            f"row '{name}', column '{column}': the text says '{a}', the JSON gives '{b}'"
            for column, a, b in zip(names, text_row, row, strict=False)
            if a != b
        ]
        if len(text_row) != len(row):
            out.append(f"row '{name}': the text has {len(text_row)} cells, the JSON {len(row)}")
    out += [f"row '{name}' is in the text but not in the JSON" for name in said]
    if said_source != source:
        out.append(f"source line: the text says '{said_source}', the JSON gives '{source}'")
    return out or ["rows in another order or spacing than the JSON gives"]


if __name__ == "__main__":
    sys.exit(main())
