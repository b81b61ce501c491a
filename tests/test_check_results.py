"""benchmarks/check_results.py on a small synthetic doc and results file: figures recomputed from JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import check_results  # noqa: E402  (a script beside quality.py, not a package)
import quality  # noqa: E402

ROW = "| AG News | 100 | 81.0 ± 1.4 | 66.0 ± 1.4 | 51.0 ± 1.4 | 0.50 ± 0.00 |"
DOC = """# Results

<!-- table quality files=quality_t.json rows=dataset,k columns=expert,greedy,random closure=greedy{flags} -->
| dataset | k | expert | greedy | random | greedy closure |
| --- | ---: | --- | --- | --- | --- |
{body}
<!-- /table -->

<!-- value quality_t.json summary.train=greedy.val_selected_test*100:.1f±{flags} -->{value}<!-- /value -->
"""
SOURCE = "*Source: `benchmarks/results/quality_t.json` (a complete run).*"


def rows() -> list[dict]:
    """Two seeds of expert, random and greedy: greedy closes half the gap in each."""
    out = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        base = {"dataset": "ag_news", "scope": "head", "seed": seed, "labels": "auto", "projection_dim": 0}
        for train, acc in (("expert", 0.80), ("random", 0.50), ("greedy", 0.65)):
            row = base | {"train": train, "k": 1000 if train == "expert" else 100}
            row |= {"best_epoch_test": acc + shift, "val_selected_test": acc + shift}
            if train == "greedy":
                row |= {"closure_best_epoch_test": 0.5, "closure_val_selected_test": 0.5}
            out.append(row)
    return out


def write(tmp_path: Path, body: str = "", value: str = "", flags: str = "", **results) -> Path:
    """A results folder holding quality_t.json and a doc quoting it; returns the doc."""
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    data = {
        "args": {},
        "device": "cpu",
        "rows": rows(),
        "complete": True,
        "summary": quality.summarise(rows()),
    }
    (folder / "quality_t.json").write_text(json.dumps(data | results))
    doc = tmp_path / "doc.md"
    doc.write_text(DOC.format(flags=flags, body=body, value=value))
    return doc


def check(doc: Path, write: bool = False) -> list[str]:
    return check_results.check([doc], doc.parent / "results", write)


def test_write_fills_the_marked_text_and_then_it_checks(tmp_path: Path) -> None:
    doc = write(tmp_path)
    assert check(doc, write=True) == []
    text = doc.read_text()
    assert f"{ROW}\n\n{SOURCE}\n<!-- /table -->" in text
    assert "-->66.0 ± 1.4<!-- /value -->" in text
    assert check(doc) == []


def test_a_differing_figure_is_named_with_both_values(tmp_path: Path) -> None:
    doc = write(tmp_path, body=ROW.replace("66.0", "66.1") + f"\n\n{SOURCE}", value="66.5 ± 1.4")
    problems = check(doc)
    assert len(problems) == 2, problems
    assert problems[0].startswith("doc.md:3 (Results), table quality: ")
    assert (
        "row 'AG News | 100', column 'greedy': the text says '66.1 ± 1.4', the JSON gives '66.0 ± 1.4'"
        in (problems[0])
    )
    assert problems[1].endswith(
        "value quality_t.json: the text says '66.5 ± 1.4', the JSON gives '66.0 ± 1.4'"
    )


def test_nan_in_a_results_file_fails(tmp_path: Path) -> None:
    doc = write(tmp_path)
    path = tmp_path / "results" / "quality_t.json"
    path.write_text(
        path.read_text().replace('"closure_val_selected_test": 0.5', '"closure_val_selected_test": NaN')
    )
    assert any(p.startswith("quality_t.json: bare NaN") for p in check(doc, write=True))


def test_a_stale_stored_summary_fails_until_rewritten(tmp_path: Path) -> None:
    doc = write(tmp_path, summary=[])
    assert any("quality_t.json: the stored summary differs from summarise(rows)" in p for p in check(doc))
    check(doc, write=True)
    assert check(doc) == []


def test_an_incomplete_run_needs_the_partial_flag(tmp_path: Path) -> None:
    doc = write(tmp_path, complete=False)
    assert all("incomplete run (complete: false); mark it `partial`" in p for p in check(doc, write=True))
    doc = write(tmp_path, flags=" partial", complete=False)
    assert check(doc, write=True) == []
    assert (
        "*Source: `benchmarks/results/quality_t.json` (an incomplete run: `complete: false`).*"
        in doc.read_text()
    )
    doc = write(tmp_path, flags=" partial")
    assert any("marked `partial`, but every file it quotes is complete" in p for p in check(doc, write=True))


def test_a_measured_strategy_left_out_of_the_table_fails(tmp_path: Path) -> None:
    topk = [r | {"train": "topk"} for r in rows() if r["train"] == "greedy"]
    doc = write(tmp_path, rows=rows() + topk, summary=quality.summarise(rows() + topk))
    assert any("leaves out the measured train topk" in p for p in check(doc, write=True))


def test_a_pending_file_is_skipped_and_a_missing_one_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    doc = write(tmp_path)
    doc.write_text(doc.read_text().replace("quality_t.json", "later.json"))
    assert any("no results file later.json" in p for p in check(doc))
    doc.write_text(
        doc.read_text().replace("closure=greedy", "closure=greedy pending").replace("± -->", "± pending -->")
    )
    assert check(doc) == []
    assert capsys.readouterr().err.count("not checked: its results file is pending") == 2


def test_the_foreign_finetune_summary_closes_each_seed_against_its_own_random_and_true_rows() -> None:
    import foreign_finetune

    truth = [{"seed": s, "best_epoch_test": 0.8, "val_selected_test": 0.8 + s / 10} for s in (0, 1)]
    rows = []
    for seed in (0, 1):
        for strategy, acc in (("greedy", 0.7), ("random", 0.6)):
            figures = {"best_epoch_test": acc, "val_selected_test": acc + seed / 10}
            rows.append({"expert": "trainer", "template": True, "strategy": strategy, "seed": seed} | figures)
    summary = foreign_finetune.summarise({"truth": truth, "rows": rows})
    by_strategy = {e["strategy"]: e for e in summary}
    assert by_strategy["truth"]["val_selected_test"] == pytest.approx(0.85)
    greedy = by_strategy["greedy"]
    assert greedy["seeds"] == 2
    assert greedy["closure_val_selected_test"] == pytest.approx(0.5)  # (0.7 − 0.6) / (0.8 − 0.6), both seeds
    assert greedy["closure_val_selected_test_std"] == pytest.approx(0.0)
    assert "closure_val_selected_test" not in by_strategy["random"]
    stored = {"args": {}, "complete": True, "truth": truth, "rows": rows, "summary": summary[:1]}
    recomputed = check_results.SUMMARISERS["foreign"](stored)
    assert check_results.first_difference(stored["summary"], recomputed, "summary")


def test_lm_recovery_runs_of_several_seeds_summarise_per_model(tmp_path: Path) -> None:
    import lm_recovery

    settings = dict.fromkeys(lm_recovery.SETTINGS, 0)
    files = []
    for seed, extra in ((0, 0.0), (0, 0.0), (1, 0.2)):  # seed 0's random trained in both of its runs
        table = [{"model": "random", "val_selected_test": 4.5 + extra, "val_selected_test_perplexity": 90.0}]
        table += [{"model": "loss_drop", "val_selected_test": 4.3, "closure_val_selected_test": 0.2 + extra}]
        files.append(tmp_path / f"run{len(files)}.json")
        files[-1].write_text(json.dumps(settings | {"seed": seed, "run": {"table": table}}))
    out = tmp_path / "lm_seeds.json"
    assert lm_recovery.main(["--summarise", ",".join(map(str, files)), "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    by_model = {e["model"]: e for e in stored["summary"]}
    assert by_model["random"]["seeds"] == 2 and by_model["random"]["val_selected_test"] == pytest.approx(4.6)
    assert by_model["loss_drop"]["closure_val_selected_test"] == pytest.approx(0.3)
    assert by_model["loss_drop"]["closure_val_selected_test_std"] == pytest.approx(0.2 / 2**0.5)
    assert not check_results.first_difference(stored["summary"], check_results.SUMMARISERS["lm"](stored), "")
    files[2].write_text(json.dumps(settings | {"k": 5, "seed": 2, "run": {"table": []}}))
    with pytest.raises(lm_recovery.W2DError, match="measured with other settings"):
        lm_recovery.seed_rows(files)


def test_a_reused_foreign_expert_keeps_the_training_time_recorded_when_it_was_made(tmp_path: Path) -> None:
    import foreign_finetune

    expert = tmp_path / "trainer"
    expert.mkdir()
    (expert / "config.json").write_text("{}")
    assert foreign_finetune.train_expert(None, "trainer", expert) == {"path": str(expert), "reused": True}
    (tmp_path / "trainer-training.json").write_text(json.dumps({"train_s": 12.5, "train_loss": 0.4}))
    reused = foreign_finetune.train_expert(None, "trainer", expert)
    assert reused == {"path": str(expert), "train_s": 12.5, "train_loss": 0.4, "reused": True}


def rewritten(tmp_path: Path, name: str, summary: list[dict], marker: str, header: str) -> str:
    """`name` holding `summary`, a doc with one table `marker` under `header`: the doc once rewritten."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / name).write_text(json.dumps({"complete": True, "summary": summary}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"<!-- table {marker} -->\n{header}\n<!-- /table -->\n")
    assert check_results.check([doc], folder, write=True) == []
    return doc.read_text()


def test_a_rows_table_path_ending_in_a_selector_keeps_every_match(tmp_path: Path) -> None:
    summary = [
        {"defense": "none", "strength": 0.0, "train": "greedy", "utility": 0.8},
        {"defense": "none", "strength": 0.0, "train": "random", "utility": 0.8},
        {"defense": "noise", "strength": 0.01, "train": "greedy", "utility": 0.7},
    ]
    marker = "rows file=defences_t.json path=summary.train=greedy columns=defense,strength,utility*100:.1f"
    text = rewritten(tmp_path, "defences_t.json", summary, marker, "| d | s | u |\n| --- | --- | ---: |")
    assert "| none | 0.0 | 80.0 |\n| noise | 0.01 | 70.0 |\n" in text


def test_a_pivot_column_may_name_its_own_expression(tmp_path: Path) -> None:
    summary = [
        {"expert": "t", "strategy": "greedy", "acc": 0.7, "closure": 0.25},
        {"expert": "t", "strategy": "random", "acc": 0.6},
    ]
    marker = (
        "pivot file=foreign_t.json path=summary rows=expert by=strategy "
        "columns=greedy,random,greedy@closure:.2f value=acc*100:.1f"
    )
    text = rewritten(
        tmp_path, "foreign_t.json", summary, marker, "| e | g | r | c |\n| --- | ---: | ---: | ---: |"
    )
    assert "| t | 70.0 | 60.0 | 0.25 |\n" in text


def test_a_selector_matches_a_number_by_value() -> None:
    entries = [{"defense": "noise", "strength": 10.0}, {"defense": "noise", "strength": 1.0}]
    assert check_results.matching(entries, "defense=noise&strength=10") == entries[:1]
    assert check_results.matching([{"flag": True}], "flag=1") == []


def test_a_selector_value_may_hold_a_percent_encoded_space() -> None:
    entries = [{"select": "--grad-at base"}, {"select": ""}]
    assert check_results.matching(entries, "select=--grad-at%20base") == entries[:1]
    assert check_results.matching(entries, "select=") == entries[1:]


def test_keys_and_selector_values_may_hold_percent_encoded_slashes_and_dots() -> None:
    data = {"labels": {"Sci/Tech": 26}, "summary": [{"select": "pool=1.5", "closure": 0.561}]}
    assert check_results.render(data, "labels.Sci%2FTech:.0f") == "26"
    assert check_results.render(data, "summary.select=pool=1%2E5.closure:.2f") == "0.56"


def test_quality_files_with_different_templates_or_losses_do_not_merge(tmp_path: Path) -> None:
    settings = {"model": "m", "train_rows": 500, "corpus": "c", "corpus_seed": 0, "expert_epochs": 2}
    settings |= {"eval_epochs": 3, "patience": 3, "max_eval_rows": 500, "batch_size": 16}
    plain, older, prompted = tmp_path / "plain.json", tmp_path / "older.json", tmp_path / "prompted.json"
    for path, extra in ((plain, {"verbalizer": "letters", "template": None}), (older, {}),
                        (prompted, {"verbalizer": "letters", "template": "Review: {text}"})):  # fmt: skip
        path.write_text(json.dumps({"args": settings | extra, "device": "cpu", "rows": rows()}))
    assert len(quality.merged_rows([str(plain), str(older)])) == len(rows())  # older files: no template
    with pytest.raises(SystemExit, match="template"):
        quality.merged_rows([str(plain), str(prompted)])
    full_loss = tmp_path / "full_loss.json"
    full_args = settings | {"label_loss": "full"}
    full_loss.write_text(json.dumps({"args": full_args, "device": "cpu", "rows": rows()}))
    with pytest.raises(SystemExit, match="label_loss"):
        quality.merged_rows([str(older), str(full_loss)])
