"""A readable report of one or more `w2d run` directories (`w2d report`).

`build_report(run_dirs, out_dir)` reads each run's results.json and selection-*/ folders
and writes, into `out_dir`:

- report.html: self-contained (figures embedded as base64 PNG, inline CSS, no external assets);
- report.md: the same content in markdown, with its figures as PNG files beside it.

Sections: the expert / recovered / random table with gap closure, grouped bar charts of
both figures (best over epochs, honest), accuracy against k when the runs differ in k,
the test metric per epoch, each selection's label histogram against the true training
labels, dataset-similarity metrics and sample recovered documents per label.
Figures are drawn with matplotlib's Agg canvas directly, so no global pyplot state changes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weights2data.errors import W2DError
from weights2data.experiment import format_closure
from weights2data.store import atomic_path, read_json, write_errors

SAMPLE_CHARS = 300
SAMPLES_PER_LABEL = 3
DPI = 110
FONT = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}
# one colour per role, the same in every figure
COLOURS = {"expert": "#4c72b0", "random": "#8c8c8c", "truth": "#222222"}
STRATEGY_COLOURS = ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#ccb974", "#64b5cd"]
FIGURES = (
    ("best_epoch_test", "best over epochs", "the original's figure: model selection on test"),
    ("val_selected_test", "honest", "epoch chosen without the test set (validation split or agreement)"),
)
SIMILARITY_COLUMNS = (
    ("sinkhorn_divergence", "Sinkhorn divergence ↓"),
    ("matching_distance", "matching distance ↓"),
    ("example_containment", "example containment ↑"),
    ("near_example_containment", "near-example containment ↑"),
    ("vocabulary_containment", "vocabulary containment ↑"),
    ("leakage.exact_duplicate_fraction", "exact-duplicate leakage"),
    ("leakage.near_duplicate_fraction", "near-duplicate leakage"),
    ("n_selection", "selection size"),
    ("n_truth", "truth size"),
)


# ---------------------------------------------------------------- loading runs


@dataclass
class Selection:
    strategy: str
    summary: dict
    samples: dict[str, list[str]]  # label name (or "all") -> first documents by rank
    label_names: list[str] | None


@dataclass
class Run:
    path: Path
    name: str
    results: dict
    selections: dict[str, Selection] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return self.results["metric"]

    @property
    def k(self) -> int:
        return int(self.results["k"])

    @property
    def strategies(self) -> list[str]:
        """Recovered training sets: every scored model but the expert and the random baseline."""
        return [n for n in self.results["scores"] if n not in ("expert", "random")]


REQUIRED_KEYS = ("expert_dataset", "k", "metric", "scores", "table")


def load_run(path: str | os.PathLike) -> Run:
    """Read one run directory written by `w2d run`; W2DError when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise W2DError(f"{path}: not a directory (pass the run directory that `w2d run` wrote)")
    results_path = path / "results.json"
    if not results_path.is_file():
        nested = sorted(p.parent.name for p in path.glob("*/results.json"))
        hint = f"; these subdirectories are run directories: {', '.join(nested[:10])}" if nested else ""
        raise W2DError(f"{path}: not a w2d run directory (no results.json; `w2d run` writes one){hint}")
    try:
        results = read_json(results_path)
    except (ValueError, OSError) as exc:
        raise W2DError(f"{results_path}: could not read it as JSON: {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(results, dict) or k not in results]
    if missing:
        raise W2DError(f"{results_path}: not the results of `w2d run` (missing {', '.join(missing)})")
    if "expert" not in results["scores"]:
        raise W2DError(f"{results_path}: no expert score")
    run = Run(path, path.resolve().name, results)
    for folder in sorted(path.glob("selection-*")):
        if folder.is_dir() and (folder / "selection.parquet").is_file():
            strategy = folder.name.removeprefix("selection-")
            run.selections[strategy] = load_selection(folder, strategy, results)
    return run


def load_selection(folder: Path, strategy: str, results: dict) -> Selection:
    import pyarrow.parquet as pq

    summary = (results.get("selections") or {}).get(strategy)
    if summary is None and (folder / "summary.json").is_file():
        summary = read_json(folder / "summary.json")
    label_names = read_json(folder / "labels.json") if (folder / "labels.json").is_file() else None
    try:
        table = pq.read_table(folder / "selection.parquet")
    except OSError as exc:
        raise W2DError(f"{folder / 'selection.parquet'}: could not read it: {exc}") from exc
    columns = table.to_pydict()
    texts = columns.get("text") or []
    order = (
        sorted(range(len(texts)), key=lambda i: columns["rank"][i])
        if "rank" in columns
        else range(len(texts))
    )
    labels = columns.get("label_name")
    samples: dict[str, list[str]] = {}
    if labels is not None:
        for name in label_names or []:
            samples[name] = []
    for i in order:
        key = str(labels[i]) if labels is not None else "all"
        bucket = samples.setdefault(key, [])
        if len(bucket) < SAMPLES_PER_LABEL:
            bucket.append(texts[i])
    return Selection(strategy, summary or {}, samples, label_names)


def unique_names(runs: list[Run]) -> None:
    """Name runs by their folder; prefix the parent folder where two share a name."""
    counts = Counter(r.name for r in runs)
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"


# ---------------------------------------------------------------- the true label distribution


def true_label_distribution(run: Run, data_dir: Path | None) -> tuple[dict[str, float] | None, str | None]:
    """Fractions of each label in the expert's training split, or (None, why not)."""
    from weights2data.data import load_dataset

    name = run.results["expert_dataset"]
    config = run.results.get("config") or {}
    seed = int((config.get("finetune") or {}).get("seed", 0))
    data_cfg = config.get("data") or {}
    try:
        dataset = load_dataset(
            name,
            data_dir=data_dir,
            text_column=data_cfg.get("text_column", "text"),
            label_column=data_cfg.get("label_column"),
            seed=seed,
        )
    except W2DError as exc:
        return None, f"the true label distribution of '{name}' is omitted: {exc}"
    if not dataset.has_labels:
        return None, f"the true training data '{name}' has no labels"
    counts = Counter(dataset.train.labels.tolist())
    total = sum(counts.values())
    return {label: counts.get(i, 0) / total for i, label in enumerate(dataset.label_names)}, None


# ---------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _strategy_colour(strategies: list[str], name: str) -> str:
    if name in COLOURS:
        return COLOURS[name]
    return STRATEGY_COLOURS[strategies.index(name) % len(STRATEGY_COLOURS)]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def scores_figure(run: Run) -> bytes:
    """Expert / recovered / random per strategy, one panel per figure, closure above each recovered bar."""
    import matplotlib

    strategies = run.strategies or ["(none)"]
    scores = run.results["scores"]
    rows = {row["model"]: row for row in run.results["table"]}
    with matplotlib.rc_context(FONT):
        width = max(9.0, 3.2 + 2.6 * len(strategies))
        fig = _figure(width, 4.6)
        axes = fig.subplots(1, 2, sharey=True)
        fig.get_layout_engine().set(wspace=0.04)
        top = max(s[f] for s in scores.values() for f, _, _ in FIGURES if s[f] is not None)
        bar_w = 0.26
        for ax, (figure, title, explain) in zip(axes, FIGURES, strict=True):
            for gi, strategy in enumerate(strategies):
                bars = [("expert", scores["expert"][figure])]
                if strategy in scores:
                    bars.append((strategy, scores[strategy][figure]))
                if "random" in scores:
                    bars.append(("random", scores["random"][figure]))
                for bi, (model, value) in enumerate(bars):
                    x = gi + (bi - (len(bars) - 1) / 2) * bar_w
                    role = model if model in ("expert", "random") else "recovered"
                    first = gi == 0 or role == "recovered"
                    ax.bar(
                        x,
                        value,
                        bar_w * 0.95,
                        color=_strategy_colour(run.strategies, model),
                        label=(model if role != "recovered" else f"recovered: {model}") if first else None,
                    )
                    ax.text(x, value, _fmt(value, 3), ha="center", va="bottom", fontsize=8.5)
            closures = [format_closure(rows.get(s, {}).get(f"closure_{figure}")) for s in strategies]
            ax.set_xticks(
                range(len(strategies)),
                [f"{s}\nclosure {c}" for s, c in zip(strategies, closures, strict=True)],
            )
            ax.set_title(f"{title}\n({explain})", fontsize=10.5)
            ax.set_xlabel("selection strategy")
            ax.set_ylim(0, top * 1.12)
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_ylabel(f"test {run.metric}")
        handles, labels = axes[0].get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: (labels[i] != "expert", labels[i] == "random"))
        fig.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="outside lower center",
            ncol=min(len(labels), 5),
            frameon=False,
        )
        fig.suptitle(
            f"{run.name}: {run.results['expert_dataset']}, k = {run.k} from {run.results.get('corpus')}",
            fontsize=12.5,
        )
        return _png(fig)


def k_figure(runs: list[Run]) -> bytes:
    """Test metric against k, one line per model, averaged over runs that share k."""
    import matplotlib

    by_k: dict[int, list[Run]] = {}
    for run in runs:
        by_k.setdefault(run.k, []).append(run)
    ks = sorted(by_k)
    models = ["expert"] + sorted({s for r in runs for s in r.strategies}) + ["random"]
    strategies = [m for m in models if m not in ("expert", "random")]
    first = runs[0]
    with matplotlib.rc_context(FONT):
        fig = _figure(12, 4.6)
        axes = fig.subplots(1, 2, sharey=True)
        fig.get_layout_engine().set(wspace=0.04)
        for ax, (figure, title, _) in zip(axes, FIGURES, strict=True):
            for model in models:
                xs, ys = [], []
                for k in ks:
                    values = [
                        r.results["scores"][model][figure] for r in by_k[k] if model in r.results["scores"]
                    ]
                    if values:
                        xs.append(k)
                        ys.append(sum(values) / len(values))
                if xs:
                    style = "--" if model in ("expert", "random") else "-"
                    ax.plot(xs, ys, style, marker="o", color=_strategy_colour(strategies, model), label=model)
            if ks[-1] / max(ks[0], 1) >= 5:
                ax.set_xscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_title(title)
            ax.set_xlabel("k (documents selected)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"test {first.metric}")
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.suptitle(
            f"{first.metric} vs k: {first.results['expert_dataset']}, corpus {first.results.get('corpus')}"
        )
        return _png(fig)


def epochs_figure(run: Run) -> bytes:
    """Test metric after each epoch, one line per trained model."""
    import matplotlib

    scores = run.results["scores"]
    with matplotlib.rc_context(FONT):
        fig = _figure(8, 4.2)
        ax = fig.subplots()
        max_epoch = 1
        for model, score in scores.items():
            epochs = [e["epoch"] for e in score.get("epochs", [])]
            values = [e["test"][run.metric] for e in score.get("epochs", [])]
            if not epochs:
                continue
            max_epoch = max(max_epoch, max(epochs))
            style = "--" if model in ("expert", "random") else "-"
            ax.plot(
                epochs, values, style, marker="o", color=_strategy_colour(run.strategies, model), label=model
            )
        ax.set_xticks(range(1, max_epoch + 1))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test {run.metric}")
        ax.set_title(f"{run.name}: test {run.metric} after each training epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        return _png(fig)


def labels_figure(run: Run, truth: dict[str, float] | None) -> bytes | None:
    """Label shares of each selection (and of the true training data), grouped by label."""
    import matplotlib

    dists = {s: sel.summary.get("label_distribution") for s, sel in run.selections.items()}
    dists = {s: d for s, d in dists.items() if d}
    if not dists:
        return None
    labels = list(truth) if truth else list(next(iter(dists.values())))
    for d in dists.values():
        labels += [name for name in d if name not in labels]
    series: list[tuple[str, list[float], str]] = []
    if truth:
        series.append(("true training data", [truth.get(name, 0.0) for name in labels], COLOURS["truth"]))
    strategies = [s for s in run.selections if s != "random"]
    for strategy, dist in dists.items():
        total = sum(dist.values()) or 1
        series.append(
            (
                f"{strategy} (n = {total})",
                [dist.get(name, 0) / total for name in labels],
                _strategy_colour(strategies, strategy),
            )
        )
    with matplotlib.rc_context(FONT):
        fig = _figure(
            min(14.0, max(8.0, 0.25 * len(labels) * len(series) + 3)), 4.4 if len(labels) <= 6 else 5.2
        )
        ax = fig.subplots()
        bar_w = 0.8 / len(series)
        for si, (name, values, colour) in enumerate(series):
            xs = [li + (si - (len(series) - 1) / 2) * bar_w for li in range(len(labels))]
            ax.bar(xs, values, bar_w * 0.95, label=name, color=colour)
        rotate = len(labels) > 6 or max(len(name) for name in labels) > 12
        ax.set_xticks(
            range(len(labels)), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center"
        )
        ax.set_ylabel("share of examples")
        ax.set_xlabel("label")
        ax.set_title(
            f"{run.name}: label distribution of each selection"
            + (" vs the true training data" if truth else "")
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        return _png(fig)


# ---------------------------------------------------------------- document model


@dataclass
class Doc:
    """The report as a list of blocks, rendered twice (HTML and markdown)."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, [[_fmt(c) for c in row] for row in rows])))

    def image(self, name: str, png: bytes, alt: str) -> None:
        self.images[name] = png
        self.blocks.append(("image", (name, alt)))

    def samples(self, groups: dict[str, list[str]]) -> None:
        self.blocks.append(("samples", groups))


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1].rstrip() + "…"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .8em 0; }
.note { color: #666; font-style: italic; }
.doc { font-size: 13.5px; margin: .3em 0 .3em 1em; padding: .3em .6em; background: #f8f8f8;
       border-left: 3px solid #ccc; }
"""


def render_html(doc: Doc, title: str) -> str:
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for kind, value in doc.blocks:
        if kind == "heading":
            level, text = value
            out.append(f"<h{level}>{html.escape(text)}</h{level}>")
        elif kind == "para":
            out.append(f"<p>{html.escape(value)}</p>")
        elif kind == "note":
            out.append(f'<p class="note">{html.escape(value)}</p>')
        elif kind == "table":
            header, rows = value
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        elif kind == "image":
            name, alt = value
            data = base64.b64encode(doc.images[name]).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">')
        elif kind == "samples":
            for label, texts in value.items():
                out.append(f"<h4>{html.escape(label)}</h4>")
                if not texts:
                    out.append('<p class="note">no document with this label was selected</p>')
                out += [f'<div class="doc">{html.escape(_truncate(t))}</div>' for t in texts]
    out.append("</body></html>\n")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|")


def render_markdown(doc: Doc, title: str) -> str:
    out = [f"# {title}", ""]
    for kind, value in doc.blocks:
        if kind == "heading":
            level, text = value
            out += [f"{'#' * level} {text}", ""]
        elif kind == "para":
            out += [value, ""]
        elif kind == "note":
            out += [f"*{value}*", ""]
        elif kind == "table":
            header, rows = value
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "image":
            name, alt = value
            out += [f"![{alt}]({name})", ""]
        elif kind == "samples":
            for label, texts in value.items():
                out += [f"**{_md_cell(label)}**", ""]
                if not texts:
                    out += ["*no document with this label was selected*", ""]
                out += [f"> {html.escape(_truncate(t))}\n" for t in texts]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- the report


def build_report(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    defences: list[str | os.PathLike] = (),
) -> Path:
    """Write report.html (self-contained) and report.md (+ PNGs) into `out_dir`; return the HTML path.

    `data_dir` (default $W2D_DATA_DIR) is where the expert's training data is looked up
    for the true label distribution; when it cannot be loaded the comparison is omitted
    with a note. `defences`: results files of benchmarks/defences.py, each drawn as a
    utility-against-closure table and figure.
    """
    from weights2data.data import data_dir as resolve_data_dir
    from weights2data.report_defences import defence_section, load_measured, measured_section

    if not run_dirs and not defences:
        raise W2DError("no run directory (and no --defences file) given")
    runs = [load_run(p) for p in run_dirs]
    measured = [(Path(p).name, load_measured(p)) for p in defences]
    unique_names(runs)
    doc = Doc()
    if runs:
        title = "weights2data report: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")
        overview(doc, runs)
        score_section(doc, runs)
        defence_section(doc, runs)
        k_section(doc, runs)
        epochs_section(doc, runs)
        label_section(doc, runs, resolve_data_dir(data_dir))
        similarity_section(doc, runs)
        selection_section(doc, runs)
        samples_section(doc, runs)
    else:
        title = "weights2data report: defences measured"
    for index, (name, data) in enumerate(measured):
        measured_section(doc, name, data, index)

    out = Path(out_dir)
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    for name, png in doc.images.items():
        _write(out / name, png)
    _write(out / "report.md", render_markdown(doc, title).encode("utf-8"))
    html_path = out / "report.html"
    _write(html_path, render_html(doc, title).encode("utf-8"))
    return html_path


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _slug(run: Run, index: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run.name)
    return f"{index:02d}-{safe}"


def overview(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Runs")
    rows = []
    for run in runs:
        r = run.results
        rows.append(
            [
                run.name,
                r["expert_dataset"],
                r.get("corpus", "–"),
                run.k,
                r.get("task", "–"),
                run.metric,
                ", ".join(run.strategies) or "–",
                _fmt(r.get("seconds"), 0),
                str(run.path),
            ]
        )
    doc.table(
        ["run", "expert data", "corpus", "k", "task", "metric", "strategies", "seconds", "directory"], rows
    )
    doc.para(
        "Gap closure = (recovered − random) / (expert − random): 1 matches the expert, 0 is no better "
        "than k random corpus documents labelled the same way. 'Best over epochs' is the original code's "
        "figure (the best test score over training epochs, i.e. model selection on the test set); "
        "'honest' picks the epoch without the test set: by a validation split carved from the training "
        "set, or (--honest-by agreement) by agreement with the finetuned model's labels on held-out "
        "corpus documents; each run's rule is listed under its scores."
    )


def score_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Expert, recovered and random")
    for i, run in enumerate(runs):
        if len(runs) > 1:
            doc.heading(run.name, 3)
        rows = []
        for row in run.results["table"]:
            rows.append(
                [
                    row["model"],
                    row["best_epoch_test"],
                    row["val_selected_test"],
                    *(
                        format_closure(row[key], 4) if key in row else None
                        for key in ("closure_best_epoch_test", "closure_val_selected_test")
                    ),
                ]
            )
        m = run.metric
        doc.table(["model", f"best-epoch {m}", f"honest {m}", "closure (best)", "closure (honest)"], rows)
        doc.image(
            f"scores-{_slug(run, i)}.png",
            scores_figure(run),
            f"expert / recovered / random test {m} per strategy for {run.name}",
        )


def k_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading(f"Test {runs[0].metric} against k")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.results["expert_dataset"], run.results.get("corpus"), run.metric), []).append(
            run
        )
    drawn = 0
    for (dataset, corpus, _), group in groups.items():
        if len({r.k for r in group}) < 2:
            continue
        doc.image(f"k-{drawn:02d}.png", k_figure(group), f"test metric against k for {dataset} from {corpus}")
        drawn += 1
    if not drawn:
        ks = sorted({r.k for r in runs})
        doc.note(
            f"Only one k per experiment (k = {', '.join(map(str, ks))}): pass several run directories "
            "of the same expert and corpus that differ in k to plot the metric against k."
        )
    elif any(len({r.k for r in g}) < 2 for g in groups.values()):
        doc.note("Experiments with a single k are left out of the plot.")


def epochs_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Test metric per epoch")
    for i, run in enumerate(runs):
        if len(runs) > 1:
            doc.heading(run.name, 3)
        scores = run.results["scores"]
        models = list(scores)
        n_epochs = max((len(s.get("epochs", [])) for s in scores.values()), default=0)
        if n_epochs == 0:
            doc.note("no per-epoch records in this run")
            continue
        doc.image(
            f"epochs-{_slug(run, i)}.png", epochs_figure(run), f"test {run.metric} per epoch, {run.name}"
        )
        rows = []
        for epoch in range(1, n_epochs + 1):
            row: list[Any] = [epoch]
            for model in models:
                record = next((e for e in scores[model].get("epochs", []) if e["epoch"] == epoch), None)
                row.append(None if record is None else record["test"][run.metric])
            rows.append(row)
        doc.table(["epoch"] + [f"{m} test {run.metric}" for m in models], rows)
        picked = [
            f"{m}: best epoch {scores[m].get('best_epoch')}, "
            f"honest epoch {scores[m].get('val_selected_epoch')} ({scores[m].get('honest_rule', '?')})"
            for m in models
        ]
        doc.para("; ".join(picked) + ".")


def label_section(doc: Doc, runs: list[Run], root: Path | None) -> None:
    doc.heading("Label distribution of the selections")
    truths: dict[tuple, tuple[dict | None, str | None]] = {}
    for i, run in enumerate(runs):
        if len(runs) > 1:
            doc.heading(run.name, 3)
        if run.results.get("task") not in (None, "classification"):
            doc.note("not a classification run: the selections carry no labels")
            continue
        key = (
            run.results["expert_dataset"],
            root,
            (run.results.get("config") or {}).get("finetune", {}).get("seed"),
        )
        if key not in truths:
            truths[key] = true_label_distribution(run, root)
        truth, why = truths[key]
        if why:
            doc.note(why)
        png = labels_figure(run, truth)
        if png is None:
            doc.note("no label distributions recorded for the selections")
            continue
        doc.image(f"labels-{_slug(run, i)}.png", png, f"label distribution per selection, {run.name}")
        labels = list(truth) if truth else []
        for sel in run.selections.values():
            labels += [n for n in (sel.summary.get("label_distribution") or {}) if n not in labels]
        rows = []
        if truth:
            rows.append(["true training data"] + [f"{truth.get(n, 0.0):.1%}" for n in labels])
        for strategy, sel in run.selections.items():
            dist = sel.summary.get("label_distribution") or {}
            rows.append([strategy] + [str(dist.get(n, 0)) for n in labels])
        doc.table(["set"] + labels, rows)


def _lookup(metrics: dict, dotted: str) -> Any:
    value: Any = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def similarity_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Similarity to the true training data")
    any_drawn = False
    for run in runs:
        sim = run.results.get("similarity")
        if len(runs) > 1:
            doc.heading(run.name, 3)
        if not sim:
            doc.note(
                "no similarity metrics in this run "
                "(it was run with --skip-similarity, or before they existed)"
            )
            continue
        columns = [
            (k, label)
            for k, label in SIMILARITY_COLUMNS
            if any(_lookup(m, k) is not None for m in sim.values())
        ]
        rows = [[strategy] + [_lookup(metrics, k) for k, _ in columns] for strategy, metrics in sim.items()]
        doc.table(["selection"] + [label for _, label in columns], rows)
        any_drawn = True
    if any_drawn:
        doc.para(
            "Sinkhorn divergence and matching distance are optimal-transport distances between "
            "sentence embeddings (cosine cost; 0 = the same distribution). Containment: the share of the "
            "true examples (or word types) the selection covers. Leakage: the share of the selection that "
            "copies (or nearly copies) a true training example."
        )


def selection_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Selections")
    rows = []
    for run in runs:
        for strategy, sel in run.selections.items():
            s = sel.summary
            rows.append(
                [
                    run.name,
                    strategy,
                    s.get("k"),
                    s.get("corpus_size"),
                    s.get("objective_cos"),
                    s.get("hidden_states_s"),
                    s.get("features_s"),
                    s.get("select_s"),
                ]
            )
    if rows:
        doc.table(
            [
                "run",
                "strategy",
                "k",
                "corpus size",
                "cos(Σ g, Δ)",
                "hidden states s",
                "features s",
                "select s",
            ],
            rows,
        )
    else:
        doc.note("no selection-*/selection.parquet folders found in the run directories")


def samples_section(doc: Doc, runs: list[Run]) -> None:
    doc.heading("Sample recovered documents")
    doc.para(
        f"The first {SAMPLES_PER_LABEL} documents of each label in pick order, cut at {SAMPLE_CHARS} "
        "characters."
    )
    for run in runs:
        for strategy, sel in run.selections.items():
            doc.heading(f"{run.name} – {strategy}" if len(runs) > 1 else strategy, 3)
            if not sel.samples:
                doc.note("empty selection")
                continue
            doc.samples(sel.samples)
