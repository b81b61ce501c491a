"""Defences in `w2d report`: what a defence costs the model (utility) against what it saves (closure).

A run made with `w2d run --defense METHOD --defense-strength S` records the defended expert's own
test metric (its utility) beside the undefended expert's, and recovery ran against the defended
model. One table line per run: the defence, its utility and each strategy's gap closure; runs
without a defence are the reference line `none`. A scatter of utility against closure draws the
trade-off: a good defence keeps its utility high while the closure falls towards 0.

`w2d report --defences FILE` draws the same trade-off from a results file of
benchmarks/defences.py, which measures every method and strength over several seeds: means with
their standard deviations as error bars.
"""

from __future__ import annotations

import math
from pathlib import Path

from weights2data.errors import W2DError
from weights2data.experiment import format_closure
from weights2data.report import FONT, Doc, Run, _figure, _fmt, _png
from weights2data.store import read_json


def defence_of(run: Run) -> tuple[str, float | None]:
    """(method, strength) of a run; ('none', None) without a defence."""
    record = run.results.get("defense")
    return ("none", None) if record is None else (record["method"], record["strength"])


def utility(run: Run) -> tuple[float | None, float | None]:
    """(defended, undefended) test metric of the expert model itself; None without a defence."""
    record = run.results.get("defense")
    if record is None:
        return None, None
    return record["utility"].get(run.metric), record["undefended"].get(run.metric)


def closures(run: Run) -> dict[str, dict]:
    """Each recovered strategy's table row (its closures)."""
    return {row["model"]: row for row in run.results["table"] if row["model"] in run.strategies}


def sort_key(run: Run) -> tuple:
    """The undefended runs first, then by method and strength."""
    method, strength = defence_of(run)
    return method != "none", method, strength or 0.0


def defence_section(doc: Doc, runs: list[Run]) -> None:
    """The trade-off table and figure, when at least one run has a defence."""
    if not any("defense" in run.results for run in runs):
        return
    ordered = sorted(runs, key=sort_key)
    strategies = list(dict.fromkeys(s for run in ordered for s in run.strategies))
    metric = runs[0].metric
    doc.heading("Defences: utility against recovery")
    rows = []
    for run in ordered:
        (method, strength), (defended, undefended) = defence_of(run), utility(run)
        table = closures(run)
        cells = [closure_cell(table.get(s)) for s in strategies]
        rows.append([method, _fmt(strength, 4), defended, undefended, *cells, run.name])
    header = ["defence", "strength", f"utility ({metric})", f"undefended {metric}"]
    doc.table([*header, *(f"{s} closure (honest / best)" for s in strategies), "run"], rows)
    doc.note(
        "Utility: the defended expert's own test metric (the undefended expert's beside it). Closure: "
        "recovery from the defended weights, labels from the defended model, against k random documents "
        "labelled by it. A defence works when its closure falls while its utility stays."
    )
    if strategies:
        alt = f"defended expert's utility against {strategies[0]} closure"
        doc.image("defences.png", tradeoff_figure(ordered, strategies[0]), alt)


def closure_cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return " / ".join(
        format_closure(row.get(f"closure_{f}")) for f in ("val_selected_test", "best_epoch_test")
    )


def tradeoff_figure(runs: list[Run], strategy: str) -> bytes:
    """Utility (y) against the honest closure of `strategy` (x), one line per method through its strengths."""
    import matplotlib

    with matplotlib.rc_context(FONT):
        fig = _figure(7.5, 4.8)
        ax = fig.subplots()
        methods: dict[str, list[tuple[float, float, float | None]]] = {}
        for run in runs:
            (method, strength), (defended, _) = defence_of(run), utility(run)
            closure = closures(run).get(strategy, {}).get("closure_val_selected_test")
            if defended is not None and closure is not None:
                methods.setdefault(method, []).append((closure, defended, strength))
        for method, points in methods.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            for x, y, strength in points:
                ax.annotate(f"{strength:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8.5)
        ax.axvline(0, color="#8c8c8c", lw=0.8)
        ax.set_xlabel(f"{strategy} gap closure (honest): lower is a better defence")
        ax.set_ylabel(f"defended expert's test {runs[0].metric}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        return _png(fig)


# ---------------------------------------------------------------- benchmarks/defences.py results


def load_measured(path: str | Path) -> dict:
    """A results file of benchmarks/defences.py; W2DError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise W2DError(f"--defences {path}: no such file (a results file of benchmarks/defences.py)")
    try:
        data = read_json(path)
    except (ValueError, OSError) as exc:
        raise W2DError(f"--defences {path}: could not read it as JSON: {exc}") from exc
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, list) or not any(
        isinstance(e, dict) and {"defense", "strength", "utility"} <= e.keys() for e in summary
    ):
        raise W2DError(
            f"--defences {path}: not a results file of benchmarks/defences.py "
            "(no summary entries with a defence, a strength and a utility)"
        )
    return data


def measured_points(data: dict) -> tuple[str, list[dict]]:
    """(strategy, its summary entries: undefended first, then by method and strength). Each entry
    carries the random selection's figures beside its own (random_val_selected_test, ...)."""
    strategy = data.get("args", {}).get("strategy", "greedy")
    points = sorted(
        (e for e in data["summary"] if e.get("defense") not in (None, "-") and e.get("train") == strategy),
        key=lambda e: (e["defense"] != "none", e["defense"], e["strength"]),
    )
    return strategy, points


def mean_std(entry: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' of a summary figure over its seeds; 'n/a' where no seed defines it."""
    value = entry.get(key)
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{scale * value:.{digits}f}"
    return (
        text + f" ± {scale * entry.get(key + '_std', 0.0):.{digits}f}" if entry.get("seeds", 1) > 1 else text
    )


def measured_section(doc: Doc, name: str, data: dict, index: int) -> None:
    """The trade-off table and figure of one benchmarks/defences.py results file."""
    strategy, points = measured_points(data)
    doc.heading(f"Defences measured: {name}")
    figures = (("utility", 100, 1), ("val_selected_test", 100, 1), ("random_val_selected_test", 100, 1),
               ("closure_val_selected_test", 1, 2))  # fmt: skip
    rows = [
        [e["defense"], f"{e['strength']:g}", *(mean_std(e, *figure) for figure in figures), e.get("seeds")]
        for e in points
    ]
    header = [
        "defence",
        "strength",
        "utility (defended acc, %)",
        f"{strategy} (honest, %)",
        "random (honest, %)",
    ]
    doc.table([*header, f"{strategy} closure (honest)", "seeds"], rows)
    state = (
        ""
        if data.get("complete", True)
        else " An incomplete run (`complete: false`): some lines may be missing."
    )
    doc.note(
        "Mean ± std over seeds. Utility: the defended expert's own test accuracy. Recovery ran on the "
        "defended weights, with labels from the defended model; closure against k random documents "
        "labelled by it and the base trained on the expert's true rows." + state
    )
    doc.image(
        f"defences-measured-{index}.png",
        measured_figure(points, strategy),
        f"utility against {strategy} closure",
    )


def measured_figure(points: list[dict], strategy: str) -> bytes:
    """Utility (y) against closure (x), error bars over seeds; each method's line starts undefended."""
    import matplotlib

    def xy(e: dict) -> tuple[float, float, float, float]:
        return (
            e.get("closure_val_selected_test", math.nan), 100 * e["utility"],
            e.get("closure_val_selected_test_std", 0.0), 100 * e.get("utility_std", 0.0),
        )  # fmt: skip

    none = [e for e in points if e["defense"] == "none"]
    with matplotlib.rc_context(FONT):
        fig = _figure(7.5, 4.8)
        ax = fig.subplots()
        for method in dict.fromkeys(e["defense"] for e in points if e["defense"] != "none"):
            line = none[:1] + [e for e in points if e["defense"] == method]
            x, y, dx, dy = zip(*(xy(e) for e in line), strict=True)
            ax.errorbar(x, y, xerr=dx, yerr=dy, marker="o", capsize=2.5, label=method)
            for e, (px, py) in zip(line[1:], zip(x[1:], y[1:], strict=True), strict=True):
                ax.annotate(
                    f"{e['strength']:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8.5
                )
        if none:
            x, y, _, _ = xy(none[0])
            ax.plot([x], [y], marker="*", markersize=13, color="black", linestyle="none", label="undefended")
        ax.axvline(0, color="#8c8c8c", lw=0.8)
        ax.set_xlabel(f"{strategy} gap closure (honest): lower is a better defence")
        ax.set_ylabel("defended expert's test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        return _png(fig)


def format_utility(results: dict) -> str:
    """One line for `w2d run`: the defence and the defended expert's own test metric."""
    record, metric = results["defense"], results["metric"]
    return (
        f"defence {record['method']} (strength {record['strength']:g}): the defended expert's own test "
        f"{metric} {record['utility'][metric]:.4f} (undefended {record['undefended'][metric]:.4f})"
    )
