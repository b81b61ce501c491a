"""`w2d report`: a report from a synthetic run directory with the structure `w2d run` writes."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from weights2data.cli import main
from weights2data.errors import W2DError
from weights2data.report import build_report, load_run

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def score(values: list[float]) -> dict:
    epochs = [
        {
            "train_loss": 1.0 / (i + 1),
            "steps": 4,
            "epoch": i + 1,
            "test": {"loss": 1.0 - v, "accuracy": v, "n": 100},
            "val": {"loss": 1.2 - v, "accuracy": v, "n": 10},
        }
        for i, v in enumerate(values)
    ]
    best = max(range(len(values)), key=lambda i: values[i])
    return {
        "metric": "accuracy",
        "best_epoch_test": values[best],
        "best_epoch": best + 1,
        "val_selected_test": values[-1],
        "val_selected_epoch": len(values),
        "honest_rule": "best validation loss",
        "epochs": epochs,
        "train_rows": 45,
        "val_rows": 5,
    }


def write_run(path: Path, k: int = 50, similarity: bool = True, dataset: str = "ag_news_100") -> Path:
    """A run directory shaped like experiment.run_experiment's output."""
    curves = {
        "expert": [0.70, 0.80, 0.82],
        "greedy": [0.50, 0.60 + k / 10000, 0.62],
        "topk": [0.40, 0.42, 0.41],
        "random": [0.45, 0.50, 0.52],
    }
    scores = {name: score(v) for name, v in curves.items()}
    table = []
    for name, s in scores.items():
        row = {
            "model": name,
            "best_epoch_test": s["best_epoch_test"],
            "val_selected_test": s["val_selected_test"],
        }
        if name not in ("expert", "random"):
            for fig in ("best_epoch_test", "val_selected_test"):
                row[f"closure_{fig}"] = (s[fig] - scores["random"][fig]) / (
                    scores["expert"][fig] - scores["random"][fig]
                )
        table.append(row)
    selections = {}
    for strategy in ("greedy", "topk", "random"):
        folder = path / f"selection-{strategy}"
        folder.mkdir(parents=True)
        labels = [i % 3 for i in range(k)]  # Sci/Tech never selected
        texts = [
            f"<b>{strategy}</b> document {i} about {LABELS[labels[i]]} & more " + "word " * 100
            for i in range(k)
        ]
        pq.write_table(
            pa.table(
                {
                    "text": texts,
                    "label": labels,
                    "label_name": [LABELS[i] for i in labels],
                    "corpus_row": list(range(k)),
                    "rank": list(range(k)),
                    "score": [1.0 - i / k for i in range(k)],
                }
            ),
            folder / "selection.parquet",
        )
        (folder / "labels.json").write_text(json.dumps(LABELS))
        summary = {
            "strategy": strategy,
            "k": k,
            "corpus_size": 300,
            "objective_cos": 0.37,
            "select_s": 0.1,
            "hidden_states_s": 0.9,
            "features_s": 1.0,
            "label_distribution": {name: labels.count(i) for i, name in enumerate(LABELS)},
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        selections[strategy] = summary
    results = {
        "expert_dataset": dataset,
        "corpus": "wiki_passages_300",
        "k": k,
        "task": "classification",
        "expert_model": "/nowhere",
        "metric": "accuracy",
        "scores": scores,
        "table": table,
        "selections": selections,
        "config": {"data": {"text_column": "text", "label_column": "label"}, "finetune": {"seed": 0}},
        "seconds": 12.5,
    }
    if similarity:
        results["similarity"] = {
            s: {
                "n_selection": k,
                "n_truth": 100,
                "sinkhorn_divergence": 0.8,
                "matching_distance": 0.7,
                "example_containment": 0.0,
                "near_example_containment": 0.01,
                "vocabulary_containment": 0.25,
                "leakage": {
                    "exact_duplicate_fraction": 0.0,
                    "near_duplicate_fraction": 0.02,
                    "exact_duplicate_indices": [],
                    "near_duplicate_indices": [3],
                },
            }
            for s in selections
        }
    (path / "results.json").write_text(json.dumps(results))
    return path


def write_truth(root: Path) -> Path:
    """A data directory holding ag_news with a known label distribution."""
    folder = root / "ag_news"
    folder.mkdir(parents=True)
    labels = [0] * 40 + [1] * 30 + [2] * 20 + [3] * 10
    pq.write_table(
        pa.table({"text": [f"news {i}" for i in range(100)], "label": labels}), folder / "train.parquet"
    )
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return root


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_from_one_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    data = write_truth(tmp_path / "data")
    out = build_report([run], tmp_path / "report", data_dir=data)
    assert out == tmp_path / "report" / "report.html"
    html = out.read_text()
    pngs = images(html)
    assert len(pngs) == 3  # scores, epochs, labels; no k plot for a single k
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "http://" not in html and "https://" not in html  # self-contained
    for section in (
        "Expert, recovered and random",
        "against k",
        "Test metric per epoch",
        "Label distribution of the selections",
        "Similarity to the true training data",
        "Sample recovered documents",
    ):
        assert section in html
    assert "Only one k" in html
    assert "true training data" in html and "40.0%" in html  # the true distribution was loaded
    assert "Sinkhorn divergence" in html and "0.8000" in html
    # samples: escaped, truncated, first three per label, and a note for the label never selected
    assert "&lt;b&gt;greedy&lt;/b&gt; document 0" in html and "<b>greedy</b>" not in html
    assert "document 2 about Business" in html and "document 6 about World" in html  # World: rows 0, 3, 6
    assert "document 9 about" not in html.split("<h3>topk</h3>")[0].split("<h3>greedy</h3>")[1]
    assert "no document with this label was selected" in html
    assert "…" in html
    closure = (0.62 - 0.52) / (0.82 - 0.52)
    assert f"{closure:.4f}" in html

    md = (tmp_path / "report" / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(linked) == 3
    for name in linked:
        assert (tmp_path / "report" / name).read_bytes() in pngs
    assert "| greedy |" in md and "Sample recovered documents" in md


def test_report_several_k_and_missing_parts(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / f"k{k}", k=k, similarity=k != 100, dataset="not_a_dataset")
        for k in (50, 100, 200)
    ]
    out = build_report(runs, tmp_path / "out", data_dir=tmp_path)
    html = out.read_text()
    assert len(images(html)) == 3 * 3 + 1  # scores, epochs, labels per run + one k plot
    assert "Only one k" not in html
    assert "true label distribution of &#x27;not_a_dataset&#x27; is omitted" in html
    assert "no similarity metrics in this run" in html
    assert any(p.name.startswith("k-") for p in (tmp_path / "out").glob("*.png"))


def test_report_nan_closure(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    for row in results["table"]:
        if "closure_best_epoch_test" in row:
            row["closure_best_epoch_test"] = math.nan
    (run / "results.json").write_text(json.dumps(results))  # NaN, as json.dumps writes it
    html = build_report([run], tmp_path / "out").read_text()
    assert "n/a" in html


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(W2DError, match="not a directory"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(W2DError, match="no results.json"):
        build_report([empty], tmp_path / "out")
    write_run(tmp_path / "parent" / "inner")
    with pytest.raises(W2DError, match="inner"):  # points at the run directory inside
        build_report([tmp_path / "parent"], tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(W2DError, match="JSON"):
        build_report([broken], tmp_path / "out")
    (broken / "results.json").write_text(json.dumps({"k": 3}))
    with pytest.raises(W2DError, match="missing"):
        build_report([broken], tmp_path / "out")
    with pytest.raises(W2DError, match="no run directory"):
        build_report([], tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--data-dir", str(write_truth(tmp_path / "data"))]) == 0
    assert (run / "report" / "report.html").exists() and (run / "report" / "report.md").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def defences_results(path: Path) -> Path:
    """A benchmarks/defences.py results file: undefended, two noise strengths, two seeds each."""
    summary = [{"defense": "-", "strength": "-", "train": "expert", "seeds": 2, "val_selected_test": 0.8}]
    for method, strength, utility, closure in (("none", 0.0, 0.8, 0.5), ("noise", 0.01, 0.78, 0.3),
                                               ("noise", 0.03, 0.6, -0.1)):  # fmt: skip
        for train in ("random", "greedy"):
            entry = {"defense": method, "strength": strength, "train": train, "seeds": 2}
            entry |= {
                "utility": utility,
                "utility_std": 0.01,
                "val_selected_test": 0.6,
                "val_selected_test_std": 0.02,
            }
            if train == "greedy":
                entry |= {"closure_val_selected_test": closure, "closure_val_selected_test_std": 0.1}
                entry |= {"random_val_selected_test": 0.6, "random_val_selected_test_std": 0.02}
            summary.append(entry)
    path.write_text(
        json.dumps({"args": {"strategy": "greedy"}, "complete": True, "rows": [], "summary": summary})
    )
    return path


def test_report_draws_the_measured_defence_tradeoff(tmp_path: Path) -> None:
    results = defences_results(tmp_path / "defences_t.json")
    assert main(["report", "--defences", str(results)]) == 0
    out = tmp_path / "defences_t-report"
    md = (out / "report.md").read_text()
    assert "| none | 0 | 80.0 ± 1.0 | 60.0 ± 2.0 | 60.0 ± 2.0 | 0.50 ± 0.10 | 2 |" in md
    assert (
        "| noise | 0.03 | 60.0 ± 1.0 | 60.0 ± 2.0 | 60.0 ± 2.0 | −0.10 ± 0.10 | 2 |".replace("−", "-") in md
    )
    assert (out / "defences-measured-0.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_report_refuses_a_file_that_is_not_defence_results(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "quality.json"
    other.write_text(json.dumps({"summary": [{"train": "greedy"}]}))
    assert main(["report", "--defences", str(other)]) == 2
    assert "not a results file of benchmarks/defences.py" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "give a RUN_DIR" in capsys.readouterr().err
