"""benchmarks/agreement_floor.py on synthetic results files: rows split at chance, each counted once."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import agreement_floor  # noqa: E402


def row(seed: int, train: str, agreement: float | None, closure: float, dataset: str = "imdb") -> dict:
    picks = {"neg": 50, "pos": 50} if dataset == "imdb" else {"A": 25, "B": 25, "C": 25, "D": 25}
    entry = {
        "dataset": dataset, "scope": "full", "k": 100, "seed": seed, "train": train, "select": "",
        "val_selected_test": 0.5 + closure / 10, "closure_val_selected_test": closure,
        "label_distribution": picks,
    }  # fmt: skip
    return entry if agreement is None else entry | {"agreement": agreement}


def write(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"args": {}, "device": "cpu", "rows": rows}))
    return str(path)


def test_rows_split_at_one_over_the_labels_and_count_once(tmp_path: Path) -> None:
    rows = [
        row(0, "expert", 1.0, 1.0),  # a baseline: left out
        row(0, "greedy", 0.40, -0.2),  # two labels: below chance
        row(1, "greedy", 0.45, 0.1),
        row(0, "topk_balanced", 0.80, 0.6),
        row(0, "greedy_balanced", None, 0.9),  # no agreement recorded: left out
        row(0, "greedy", 0.30, 0.4, dataset="ag_news"),  # four labels: above chance
    ]
    a = write(tmp_path / "a.json", rows)
    b = write(tmp_path / "b.json", rows[:3])  # the same rows again
    found = agreement_floor.student_rows([a, b])
    assert len(found) == 4
    below = {(r["dataset"], r["seed"]) for r in found if r["below_chance"]}
    assert below == {("imdb", 0), ("imdb", 1)}
    by_side = {s["side"]: s for s in agreement_floor.summarise(found)}
    assert by_side["below_chance"]["seeds"] == 2 and by_side["below_chance"]["above_random"] == 1
    assert by_side["below_chance"]["closure_max"] == pytest.approx(0.1)
    assert by_side["below_chance"]["regimes"] == {"imdb full k=100": 2}
    assert by_side["at_or_above_chance"]["closure_median"] == pytest.approx(0.5)
    out = tmp_path / "floor.json"
    assert agreement_floor.main([a, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sources"] == ["a.json"]


def test_files_without_agreements_or_label_counts_are_refused(tmp_path: Path) -> None:
    bare = write(tmp_path / "bare.json", [row(0, "greedy", None, 0.3)])
    with pytest.raises(SystemExit, match="--record-proxies"):
        agreement_floor.main([bare])
    unlabelled = row(0, "greedy", 0.4, 0.3) | {"label_distribution": None}
    with pytest.raises(SystemExit, match="records its picks' labels"):
        agreement_floor.student_rows([write(tmp_path / "u.json", [unlabelled])])
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a results file"):
        agreement_floor.main([str(tmp_path / "junk.json")])
