"""`w2d run` and `w2d select` end to end on the tiny model, and their bad inputs."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from weights2data.cli import main
from weights2data.experiment import closure, format_closure

RUN = [
    "run", "--model", "tiny-test", "--dataset", "ag_news_64", "--select_seed_dataset", "wiki_passages_120",
    "-k", "24", "--strategies", "greedy,topk", "--eval-epochs", "2", "--max-eval-rows", "48",
    "--batch-size", "16", "--skip-similarity", "--results_dir", "runs",
]  # fmt: skip


def test_closure() -> None:
    assert closure(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert closure(2.5, 3.0, 2.0, lower_is_better=True) == pytest.approx(0.5)  # losses
    assert math.isnan(closure(0.7, 0.6, 0.6))
    # an expert no better than random leaves no gap: not a closure of 2.0
    assert math.isnan(closure(0.074, 0.078, 0.076))
    assert math.isnan(closure(2.5, 2.0, 3.0, lower_is_better=True))
    assert format_closure(closure(0.074, 0.078, 0.076)) == "n/a"
    assert format_closure(0.5, 3) == "0.500"


def test_run_end_to_end(cli_env) -> None:
    run = [(a if a != "greedy,topk" else "greedy,topk,loss_drop_balanced") for a in RUN]
    assert main([*run, "--exp_name", "tiny", "--train-scope", "top:1", "--lr", "1e-3"]) == 0
    results = json.loads((cli_env / "runs" / "tiny" / "results.json").read_text())
    names = ["greedy", "topk", "loss_drop_balanced", "random"]
    assert [row["model"] for row in results["table"]] == ["expert", *names]
    assert "closure_val_selected_test" in results["table"][1]
    assert set(results["selections"]) == set(names)
    for name in names:
        table = pq.read_table(cli_env / "runs" / "tiny" / f"selection-{name}" / "selection.parquet")
        assert table.num_rows == 24 and set(table.column("label_name").to_pylist()) <= {
            "World", "Sports", "Business", "Sci/Tech",
        }  # fmt: skip
    assert (cli_env / "runs" / "tiny" / "metrics.json").exists()


def test_a_strategy_with_its_own_settings_picks_as_a_run_with_those_settings(cli_env) -> None:
    top1 = [(a if a != "greedy,topk" else "greedy") for a in RUN] + ["--train-scope", "top:1", "--lr", "1e-3"]
    entries = "greedy,greedy@precondition=kfac,auto,topk_balanced@precondition=kfac"
    assert main([*top1, "--strategies", entries, "--exp_name", "mixed"]) == 0
    assert main([*top1, "--precondition", "kfac", "--exp_name", "kfac"]) == 0
    mixed = json.loads((cli_env / "runs" / "mixed" / "results.json").read_text())
    names = ["expert", *entries.split(","), "random"]
    assert [row["model"] for row in mixed["table"]] == names
    assert mixed["selections"]["greedy@precondition=kfac"]["config"]["precondition"] == "kfac"
    assert mixed["selections"]["greedy"]["config"]["precondition"] == "auto"
    assert mixed["selections"]["auto"]["strategy"] == "topk_balanced"  # 4 labels

    def picks(run: str, name: str) -> list[int]:
        path = cli_env / "runs" / run / f"selection-{name}" / "selection.parquet"
        return pq.read_table(path).column("corpus_row").to_pylist()

    assert picks("mixed", "greedy@precondition=kfac") == picks("kfac", "greedy")
    assert picks("mixed", "auto") == picks("mixed", "topk_balanced@precondition=kfac")
    assert picks("mixed", "greedy") != picks("kfac", "greedy")
    assert picks("mixed", "random") == picks("kfac", "random")  # the baseline keeps the run's settings


def test_run_picks_honest_epochs_by_agreement_with_the_expert(cli_env) -> None:
    args = [*RUN, "--exp_name", "agree", "--honest-by", "agreement", "--agreement-rows", "40"]
    assert main([*args, "--train-scope", "top:1", "--lr", "1e-3"]) == 0
    scores = json.loads((cli_env / "runs" / "agree" / "results.json").read_text())["scores"]
    for name in ("expert", "greedy", "topk", "random"):
        assert scores[name]["honest_rule"].startswith("best agreement with the finetuned model on")
        assert scores[name]["val_rows"] <= 40 and 0 <= scores[name]["agreement"] <= 1
    assert scores["expert"]["val_rows"] == 40  # the expert's rows are not corpus documents
    assert scores["greedy"]["train_rows"] == 24  # every pick trains


def test_run_with_pseudo_experts_and_the_original_flag_names(cli_env) -> None:
    args = [("greedy_balanced" if a == "greedy,topk" else a) for a in RUN]
    args += ["--select_num_pseudoexperts", "2", "--select_use_expert_grads", "1", "--grad-at", "both"]
    args += ["--path-combine", "concat", "--precondition", "adam", "--train-scope", "top:1", "--lr", "1e-3"]
    args += ["--max_iterations", "2", "--select_steps_per_grad", "3"]  # rounds, each student 3 steps
    assert main([*args, "--exp_name", "pe"]) == 0
    results = json.loads((cli_env / "runs" / "pe" / "results.json").read_text())
    assert results["config"]["select"]["pseudo_experts"] == 2
    distribution = results["selections"]["greedy_balanced"]["label_distribution"]
    assert max(distribution.values()) <= 6 and sum(distribution.values()) == 24  # ⌈12 / 4⌉ a label a round
    assert [r["k"] for r in results["selections"]["greedy_balanced"]["rounds"]] == [12, 12]
    assert results["selections"]["greedy_balanced"]["student"]["steps"] == 3


def test_select_command(cli_env) -> None:
    assert main(["finetune", "--model", "tiny-test", "--dataset", "ag_news_32", "--train-scope", "head",
                 "--lr", "1e-2", "--results-dir", "runs", "--exp-name", "ft"]) == 0  # fmt: skip
    args = ["select", "--base", "tiny-test", "--finetuned", "runs/ft/model", "--corpus", "wiki_passages_80",
            "-k", "10", "--results-dir", "runs", "--exp-name", "sel"]  # fmt: skip
    assert main(args) == 0
    table = pq.read_table(cli_env / "runs" / "sel" / "selection.parquet").to_pydict()
    assert table["rank"] == list(range(10)) and len(set(table["corpus_row"])) == 10
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert sum(summary["label_distribution"].values()) == 10
    asked = json.loads((cli_env / "runs" / "sel" / "config.json").read_text())["select"]
    assert asked["strategy"] == "auto"  # the default, made balanced top-k on whitened gradients: 4 labels
    assert (summary["strategy"], summary["precondition"]) == ("topk_balanced", "kfac")
    assert max(summary["label_distribution"].values()) <= 3  # a quota of ⌈10 / 4⌉
    assert main([*args[:-1], "drop", "--strategy", "loss_drop_balanced"]) == 0
    summary = json.loads((cli_env / "runs" / "drop" / "summary.json").read_text())
    assert summary["strategy"] == "loss_drop_balanced" and max(summary["label_distribution"].values()) <= 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--opt", "MAGIC"], "unknown opt 'MAGIC'"),
        (["--num_experts", "3"], "only one expert"),
        (["-k", "500"], "larger than the corpus"),
        (["--strategies", "magic"], "unknown strategy"),
        (["--strategies", "greedy,greedy_balanced@precondition=magic"], "unknown precondition 'magic'"),
    ],
)
def test_run_bad_input(cli_env, capsys, extra: list[str], message: str) -> None:
    assert main([*RUN, "--exp_name", "bad", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (cli_env / "runs" / "bad").exists()  # nothing half-written is left behind


def test_select_bad_input(cli_env, capsys) -> None:
    args = ["select", "--base", "tiny-test", "--finetuned", "tiny-test:1", "--corpus", "wiki_passages_50",
            "-k", "5", "--results-dir", "runs", "--exp-name", "nolabels"]  # fmt: skip
    assert main(args) == 2
    assert "needs a label set" in capsys.readouterr().err
    assert main([*args[:-1], "nolabels2", "--label-set", "A,B"]) == 0
    # the same weights twice: no weight change to explain
    same = [*args[:4], "tiny-test", *args[5:-1], "same", "--label-set", "A,B"]
    assert main(same) == 2
    err = capsys.readouterr().err
    assert "equal the base weights" in err and "Traceback" not in err
