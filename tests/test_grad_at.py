"""benchmarks/grad_at.py on synthetic results files: rows pair by setting and seed, gains and
skews are what the rows say, and the tally counts settings."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import grad_at  # noqa: E402


def quality_row(seed: int, train: str, select: str, test: float, picks: dict | None = None) -> dict:
    return {
        "dataset": "ag_news", "scope": "top:2", "k": 100, "labels": "auto", "projection_dim": 0,
        "grad_blocks": 0, "seed": seed, "train": train, "select": select, "val_selected_test": test,
        "closure_val_selected_test": test - 0.5, "objective_cos": 0.7, "label_distribution": picks,
    }  # fmt: skip


def write(path: Path, rows: list[dict], args: dict | None = None) -> str:
    path.write_text(
        json.dumps({"args": {"verbalizer": "letters"} | (args or {}), "device": "cpu", "rows": rows})
    )
    return str(path)


def two_seeds() -> list[dict]:
    rows = []
    for seed in (0, 1):
        rows += [
            quality_row(seed, "expert", "", 0.9),
            quality_row(seed, "random", "", 0.5),
            quality_row(seed, "greedy", "", 0.70, {"A": 70, "B": 10, "C": 10, "D": 10}),
            quality_row(seed, "greedy", "grad_at=base", 0.60 + seed / 4),  # ahead in seed 1 only
            quality_row(seed, "greedy", "grad_at=both path_combine=concat", 0.75),
            quality_row(
                seed, "greedy_balanced", "grad_at=finetuned", 0.72, {"A": 25, "B": 25, "C": 25, "D": 25}
            ),
            quality_row(seed, "greedy_balanced", "grad_at=base", 0.71),
            quality_row(seed, "topk_balanced", "", 0.66),  # measured at one point: left out
            quality_row(seed, "greedy", "pseudo_experts=4 path_combine=concat", 0.8),  # a path: left out
        ]
    return rows


def test_each_point_pairs_with_the_finetuned_row_of_its_setting_and_seed(tmp_path: Path) -> None:
    rows = grad_at.compare(grad_at.quality_rows([write(tmp_path / "q.json", two_seeds())]), "q")
    by = {(r["train"], r["seed"], r["point"]): r for r in rows}
    assert {train for train, _, _ in by} == {"greedy", "greedy_balanced"}
    assert {point for _, _, point in by} == {"finetuned", "base", "both_concat"}
    assert by["greedy", 0, "base"]["gain"] == pytest.approx(-0.10)
    assert by["greedy", 1, "base"]["gain"] == pytest.approx(0.15)
    assert by["greedy", 0, "finetuned"]["gain"] == 0
    # greedy's picks at the finetuned weights: 0.7 of one label of four, TV = 0.7 − 0.25
    assert by["greedy_balanced", 0, "base"]["picks_skew"] == pytest.approx(0.45)
    assert by["greedy", 0, "both_concat"]["fit"] == 0.7
    summary = grad_at.summarise(rows)
    base = next(e for e in summary if e["group"] == "q" and e["train"] == "greedy" and e["point"] == "base")
    assert (base["seeds"], base["better"], base["worse"]) == (2, 1, 1)
    assert base["gain"] == pytest.approx(0.025)
    ours = next(e for e in summary if e["group"] == "all" and e["experts"] == "ours" and e["point"] == "base")
    assert ours == {
        "group": "all", "experts": "ours", "point": "base", "settings": 2, "ahead": 1, "behind": 1,
        "ahead_every_seed": 0, "behind_every_seed": 1, "median_gain": pytest.approx((0.025 - 0.01) / 2),
    }  # fmt: skip
    assert not any(e["group"] == "all" and e["experts"] == "foreign" for e in summary)


def test_files_joined_by_plus_must_agree_and_a_foreign_file_stands_alone(tmp_path: Path) -> None:
    first = write(tmp_path / "a.json", two_seeds())
    other = [
        r | {"val_selected_test": 0.99} if r["train"] == "greedy" and r["select"] == "" else r
        for r in two_seeds()
    ]
    second = write(tmp_path / "b.json", other)
    with pytest.raises(SystemExit, match="measured twice with different results"):
        grad_at.compare(grad_at.quality_rows([first, second]), "a")
    with pytest.raises(SystemExit):
        grad_at.main([f"{first}+{tmp_path / 'missing.json'}"])
    broken = tmp_path / "foreign_broken.json"
    broken.write_text("{}")
    with pytest.raises(SystemExit):
        grad_at.main([str(broken)])
    foreign = tmp_path / "foreign_finetune.json"
    foreign.write_text(
        json.dumps({"args": {"dataset": "rotten_tomatoes", "top_blocks": 4}, "truth": [], "rows": []})
    )
    with pytest.raises(SystemExit):
        grad_at.main([f"{foreign}+{first}"])


def test_foreign_rows_close_against_the_true_rows(tmp_path: Path) -> None:
    def row(strategy: str, select: str, test: float) -> dict:
        picks = {"negative": 20, "positive": 80}
        return {"expert": "lora", "template": True, "select": select, "strategy": strategy, "seed": 0} | {
            "k": 100, "val_selected_test": test, "objective_cos": 0.03, "label_distribution": picks
        }  # fmt: skip

    rows = [row("random", "", 0.6), row("greedy", "", 0.7), row("greedy", "--grad-at base", 0.76)]
    data = {"args": {"dataset": "rotten_tomatoes", "top_blocks": 4, "seq_len": 64}, "rows": rows}
    path = tmp_path / "foreign_finetune_x.json"
    path.write_text(json.dumps(data | {"truth": [{"seed": 0, "val_selected_test": 0.8}]}))
    out = tmp_path / "gradat.json"
    assert grad_at.main([f"LoRA, one seed={path}", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    base = next(r for r in written["rows"] if r["point"] == "base")
    assert base["closure_val_selected_test"] == pytest.approx(0.8)  # (0.76 − 0.6) / (0.8 − 0.6)
    assert base["gain"] == pytest.approx(0.06) and base["picks_skew"] == pytest.approx(0.3)
    assert base["labels"] == "words, template" and base["scope"] == "top:4" and base["expert"] == "lora"
    assert base["seq_len"] == 64 and base["group"] == "LoRA, one seed"
    assert written["summary"] == grad_at.summarise(written["rows"])
