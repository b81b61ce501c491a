"""Defences in `w2d report`: what a defence costs the model (utility) against what it saves (closure).

A run made with `w2d run --defense METHOD --defense-strength S` records the defended expert's own
test metric (its utility) beside the undefended expert's, and recovery ran against the defended
model. One table line per run: the defence, its utility and each strategy's gap closure; runs
without a defence are the reference line `none`. A scatter of utility against closure draws the
trade-off: a good defence keeps its utility high while the closure falls towards 0.
"""

from __future__ import annotations

from weights2data.experiment import format_closure
from weights2data.report import FONT, Doc, Run, _figure, _fmt, _png


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


def format_utility(results: dict) -> str:
    """One line for `w2d run`: the defence and the defended expert's own test metric."""
    record, metric = results["defense"], results["metric"]
    return (
        f"defence {record['method']} (strength {record['strength']:g}): the defended expert's own test "
        f"{metric} {record['utility'][metric]:.4f} (undefended {record['undefended'][metric]:.4f})"
    )
