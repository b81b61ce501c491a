"""benchmarks/strategy_choice.py on synthetic quality rows: each rule picks what it says."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import strategy_choice  # noqa: E402


def row(seed: int, name: str, agreement: float, balanced: float, test: float) -> dict:
    train, select = name.split("@")
    return {
        "dataset": "ag_news", "scope": "top:2", "k": 300, "seed": seed, "train": train, "select": select,
        "agreement": agreement, "balanced_agreement": balanced, "weight_cos": 1 - agreement,
        "val_selected_test": test, "closure_val_selected_test": test - 0.5,
        "label_distribution": {"A": 25, "B": 25, "C": 25, "D": 25},
    }  # fmt: skip


THREE = ("greedy", "topk_balanced", "pool_balanced")


def rows_of_seed(seed: int) -> list[dict]:
    greedy, topk, pool = (strategy_choice.CANDIDATES[name] for name in THREE)
    return [
        row(seed, greedy, 0.90, 0.70, 0.60),  # copies the expert's commonest label: most agreement
        row(seed, "greedy_balanced@precondition=auto", 0.80, 0.95, 0.62),  # not a candidate
        row(seed, topk, 0.60, 0.60, 0.50 + seed / 10),  # the test's best in seed 2
        row(seed, pool, 0.85, 0.80, 0.66),  # most balanced agreement
        row(seed, "random@precondition=auto", 0.95, 0.95, 0.99),  # not a candidate
    ]


def test_each_rule_picks_by_its_own_figure_and_the_summary_averages_seeds() -> None:
    chosen = strategy_choice.choices([r for seed in range(3) for r in rows_of_seed(seed)], THREE)
    by = {(r["seed"], r["rule"]): r["chose"] for r in chosen}
    greedy, topk, pool = THREE
    assert {by[s, "by_agreement"] for s in range(3)} == {greedy}
    assert {by[s, "by_balanced_agreement"] for s in range(3)} == {pool}
    assert {by[s, "by_weight_change"] for s in range(3)} == {topk}
    assert [by[s, "oracle"] for s in range(3)] == [pool, pool, topk]
    summary = {(e["dataset"], e["rule"]): e for e in strategy_choice.summarise(chosen)}
    oracle = summary["ag_news", "oracle"]
    assert oracle["val_selected_test"] == pytest.approx((0.66 + 0.66 + 0.70) / 3)
    assert oracle["chosen"] == {pool: 2, topk: 1} and oracle["seeds"] == 3
    assert summary["all", "by_balanced_agreement"]["closure_val_selected_test"] == pytest.approx(0.16)
    assert summary["ag_news", "oracle"]["against_greedy"] == {
        "better": 3, "tied": 0, "worse": 0, "largest_loss": 0.0
    }  # fmt: skip
    topk_against = summary["ag_news", topk]["against_greedy"]
    assert topk_against | {"largest_loss": 0} == {"better": 1, "tied": 1, "worse": 1, "largest_loss": 0}
    assert topk_against["largest_loss"] == pytest.approx(0.10)  # seed 0: 0.50 against 0.60


def test_the_floored_rule_leaves_out_students_below_chance() -> None:
    rows = rows_of_seed(0)  # top-k's student has the largest weight cosine and agrees 0.60
    by = {r["rule"]: r["chose"] for r in strategy_choice.choices(rows, THREE)}
    assert by["by_weight_change_above_chance"] == by["by_weight_change"] == "topk_balanced"
    two = [r | {"label_distribution": {"A": 50, "B": 50}} for r in rows]  # chance 0.5
    two[2]["agreement"] = 0.45  # top-k's student: below it, and out
    by = {r["rule"]: r["chose"] for r in strategy_choice.choices(two, THREE)}
    assert (
        by["by_weight_change_above_chance"] == "pool_balanced" and by["by_weight_change"] == "topk_balanced"
    )
    below = [r | {"agreement": 0.1} for r in two]  # none agrees: all stay in
    by = {r["rule"]: r["chose"] for r in strategy_choice.choices(below, THREE)}
    assert by["by_weight_change_above_chance"] == "topk_balanced"
    unlabelled = [r | {"label_distribution": None} for r in rows]
    with pytest.raises(SystemExit, match="records its picks' labels"):
        strategy_choice.choices(unlabelled, THREE)


def test_a_file_without_recorded_agreement_is_refused() -> None:
    rows = rows_of_seed(0)
    del rows[0]["weight_cos"]
    with pytest.raises(SystemExit, match="--record-proxies"):
        strategy_choice.choices(rows, THREE)


def test_every_candidate_asked_for_must_be_measured_and_counts(tmp_path: Path) -> None:
    rows = rows_of_seed(0)
    with pytest.raises(SystemExit, match="no row for kfac_balanced"):
        strategy_choice.choices(rows)  # all four by default
    rows.append(row(0, strategy_choice.CANDIDATES["kfac_balanced"], 0.5, 0.5, 0.70))
    by = {r["rule"]: r["chose"] for r in strategy_choice.choices(rows)}
    assert by["oracle"] == by["kfac_balanced"] == "kfac_balanced" and by["by_agreement"] == "greedy"
    results = tmp_path / "quality.json"
    results.write_text(json.dumps({"rows": rows}))
    with pytest.raises(SystemExit):
        strategy_choice.main([str(results), "--candidates", "greedy,nonesuch"])
    out = tmp_path / "choice.json"
    two = ["--candidates", "greedy,kfac_balanced"]
    assert strategy_choice.main([str(results), *two, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["candidates"] == ["greedy", "kfac_balanced"]


def test_datasets_keeps_the_regimes_of_those_datasets_only(tmp_path: Path) -> None:
    rows = rows_of_seed(0) + [dict(r, dataset="imdb") for r in rows_of_seed(0)[:2]]  # imdb lacks topk
    results = tmp_path / "quality.json"
    results.write_text(json.dumps({"rows": rows}))
    three = ["--candidates", ",".join(THREE)]
    with pytest.raises(SystemExit, match="imdb top:2 seed 0: no row for topk_balanced"):
        strategy_choice.main([str(results), *three])
    out = tmp_path / "choice.json"
    assert strategy_choice.main([str(results), *three, "--datasets", "ag_news", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["datasets"] == ["ag_news"] and {r["dataset"] for r in saved["rows"]} == {"ag_news"}
    with pytest.raises(SystemExit):
        strategy_choice.main([str(results), *three, "--datasets", "newsgroup"])  # no such rows


def test_a_candidate_scored_differently_in_two_files_is_refused() -> None:
    rows = rows_of_seed(0)
    again = dict(rows[2], val_selected_test=0.75)  # top-k balanced, another expert
    with pytest.raises(SystemExit, match="topk_balanced measured twice"):
        strategy_choice.choices([*rows, again], THREE)
    assert strategy_choice.choices([*rows, dict(rows[2])], THREE)  # the same row twice is fine
