"""The `w2d` command: help, bad input (a one-line error, exit 2, no traceback) and small real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weights2data.cli import main, sparse_label_line


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


HELP_FLAGS = {
    None: ["finetune", "evaluate", "train-eval", "demo", "smollm2-135m", "tiny-test"],
    "finetune": [
        "--model",
        "--dataset",
        "--seq-len",
        "--verbalizer",
        "--task",
        "--lr",
        "--optimizer",
        "--epochs",
        "--batch-size",
        "--train-scope",
        "--lm-loss",
        "--seed",
        "--text-column",
        "--label-column",
        "--data-dir",
        "--cache-dir",
        "--results-dir",
        "--allow-pickle",
        "--config",
    ],
    "evaluate": ["--model", "--dataset", "--max-eval-rows", "--eval-batch-size", "--seq-len", "--device"],
    "train-eval": [
        "--model",
        "--train",
        "--finetuned",
        "--dataset",
        "--eval-epochs",
        "--patience",
        "--val-fraction",
        "--train-scope",
        "--lr",
    ],
    "demo": ["--data-dir", "--device", "--cache-dir", "--results-json"],
}


@pytest.mark.parametrize("command", list(HELP_FLAGS))
def test_help(command: str | None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in HELP_FLAGS[command]:
        assert flag in out, flag


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: w2d" in capsys.readouterr().err


def test_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--lr", "fast"])
    assert exit_info.value.code == 2
    assert "invalid float value" in capsys.readouterr().err


FT = ["finetune", "--model", "tiny-test", "--dataset", "ag_news_64"]
BAD_INPUTS = {
    "unknown model": (
        ["finetune", "--model", "no-such-model-w2d", "--dataset", "ag_news_64"],
        "no-such-model-w2d",
    ),
    "missing model dir": (["evaluate", "--model", "./no/such/dir", "--dataset", "ag_news"], "not found"),
    "unknown dataset": (
        ["finetune", "--model", "tiny-test", "--dataset", "no_such_dataset"],
        "unknown dataset",
    ),
    "seq len 1": ([*FT, "--seq-len", "1"], "at least 2"),
    "verbalizer count": ([*FT, "--verbalizer", "A,B"], "lists 2 tokens"),
    "verbalizer multi-token": ([*FT, "--verbalizer", "names"], "Sci/Tech"),
    "N too large": (["finetune", "--model", "tiny-test", "--dataset", "ag_news_99999"], "99999"),
    "bad scope": ([*FT, "--train-scope", "top:0"], "train scope"),
    "bad optimizer": ([*FT, "--optimizer", "lbfgs"], "optimizer"),
    "bad device": ([*FT, "--device", "gpu9"], "device"),
    "no labels": (
        ["evaluate", "--model", "tiny-test", "--dataset", "wiki_passages", "--task", "classification"],
        "no labels",
    ),
    "unlabelled train set": (
        ["train-eval", "--model", "tiny-test", "--train", "wiki_passages_10", "--dataset", "ag_news"],
        "no labels",
    ),
    "missing config": ([*FT, "--config", "missing.toml"], "could not read config file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case: str, cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    argv, expected = BAD_INPUTS[case]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("w2d: error: ")]
    assert errors == [len(lines) - 1], err  # exactly one error line, and it is the last line
    assert expected in lines[-1]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[finetune]\nlr = "fast"\n', "lr must be"),
        ("[finetune]\nlearning_rate = 1\n", "learning_rate"),
        ("[trainer]\nlr = 1\n", "trainer"),
    ],
)
def test_bad_toml_is_one_line_exit_2(
    toml: str, expected: str, cli_env: Path, capsys: pytest.CaptureFixture
) -> None:
    (cli_env / "run.toml").write_text(toml)
    code, _, err = run([*FT, "--config", "run.toml"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("w2d: error: ") and expected in err


def test_finetune_then_evaluate(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    runs = cli_env / "results"
    common = ["--results-dir", str(runs)]
    finetune = ["finetune", "--model", "tiny-test", "--dataset", "ag_news_64", "--epochs", "1", *common]
    code, out, err = run([*finetune, "--exp-name", "ft"], capsys)
    assert code == 0, err
    model = runs / "ft" / "model"
    assert model.is_symlink() and (model / "w2d.json").exists() and (model / "model.safetensors").exists()
    assert str(model.resolve()).startswith(str((cli_env / "cache").resolve()))  # saved in $W2D_CACHE_DIR
    metrics = json.loads((runs / "ft" / "metrics.json").read_text())
    assert (
        metrics["train_rows"] == 64 and len(metrics["history"]) == 1 and metrics["history"][0]["steps"] == 2
    )
    config = json.loads((runs / "ft" / "config.json").read_text())
    assert config["command"] == "finetune" and config["model"] == "tiny-test"
    assert "finetuned model:" in out

    code, out, err = run([*finetune, "--exp-name", "ft2"], capsys)
    assert code == 0 and "reusing" in err
    assert (runs / "ft2" / "model").resolve() == model.resolve()

    code, out, err = run(
        [
            "evaluate",
            "--model",
            str(model),
            "--dataset",
            "ag_news",
            "--max-eval-rows",
            "64",
            "--exp-name",
            "ev",
            *common,
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((runs / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 64 and metrics["task"] == "classification" and 0 <= metrics["accuracy"] <= 1
    assert metrics["loss"] > 0 and "accuracy" in out


def test_train_eval_writes_both_figures(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(
        [
            "train-eval",
            "--model",
            "tiny-test",
            "--train",
            "ag_news_64",
            "--dataset",
            "ag_news",
            "--eval-epochs",
            "2",
            "--max-eval-rows",
            "64",
            "--exp-name",
            "te",
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((cli_env / "runs" / "te" / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and len(metrics["epochs"]) == 2
    tests = [e["test"]["accuracy"] for e in metrics["epochs"]]
    assert metrics["best_epoch_test"] == max(tests)
    assert metrics["val_selected_test"] == tests[-1] and metrics["honest_rule"] == "last epoch"
    assert all(e["test"]["n"] == 64 for e in metrics["epochs"])
    assert "best over epochs" in out and "honest" in out


def test_train_eval_reports_the_weight_change_cosine_to_a_finetune(
    cli_env: Path, capsys: pytest.CaptureFixture
) -> None:
    """--finetuned: how closely training on --train moved the weights the way the finetune did."""
    runs = cli_env / "results"
    common = ["--results-dir", str(runs), "--model", "tiny-test"]
    code, _, err = run([*FT, "--epochs", "1", "--results-dir", str(runs), "--exp-name", "ft"], capsys)
    assert code == 0, err
    train_eval = ["train-eval", "--train", "ag_news_64", "--dataset", "ag_news", "--max-eval-rows", "64"]
    same = [*train_eval, "--eval-epochs", "1", "--epochs", "1", *common]
    code, out, err = run([*same, "--finetuned", str(runs / "ft" / "model"), "--exp-name", "te"], capsys)
    assert code == 0, err
    metrics = json.loads((runs / "te" / "metrics.json").read_text())
    assert metrics["weight_cos"] == pytest.approx(1.0, abs=1e-3)  # the finetune's own rows and steps
    assert "weight change cosine" in out
    code, _, err = run([*same, "--finetuned", "no-such-model-w2d", "--exp-name", "bad"], capsys)
    assert code != 0 and "no-such-model-w2d" in err and "Traceback" not in err


def test_train_eval_reports_agreement_with_the_finetune_on_held_out_corpus_passages(
    cli_env: Path, capsys: pytest.CaptureFixture
) -> None:
    """--agreement-corpus: the student's agreement with the finetuned model's labels, read
    without the test split, on passages --train does not hold; below chance it is flagged."""
    from weights2data.cli import agreement_lines

    runs = cli_env / "results"
    common = ["--results-dir", str(runs), "--model", "tiny-test"]
    code, _, err = run([*FT, "--epochs", "1", "--results-dir", str(runs), "--exp-name", "ft"], capsys)
    assert code == 0, err
    train_eval = ["train-eval", "--train", "ag_news_64", "--dataset", "ag_news", "--max-eval-rows", "64"]
    same = [*train_eval, "--eval-epochs", "1", "--epochs", "1", "--agreement-rows", "40", *common]
    finetuned = ["--finetuned", str(runs / "ft" / "model")]
    agree = ["--agreement-corpus", "wiki_passages_120"]
    code, out, err = run([*same, *finetuned, *agree, "--exp-name", "te"], capsys)
    assert code == 0, err
    metrics = json.loads((runs / "te" / "metrics.json").read_text())
    assert 0 <= metrics["agreement"] <= 1 and 0 <= metrics["balanced_agreement"] <= 1
    assert "on 40 held-out wiki_passages_120 passages" in out and "chance 0.2500" in out
    assert ("below chance" in out) == (metrics["agreement"] < 0.25)
    code, out, err = run([*same, *finetuned, *agree, "--honest-by", "agreement", "--exp-name", "ag"], capsys)
    assert code == 0, err  # the same passages choose the honest epoch
    assert "best agreement with the finetuned model on 40 corpus documents" in out
    code, _, err = run([*same, *agree, "--exp-name", "bad"], capsys)
    assert code != 0 and "give --finetuned" in err and "Traceback" not in err
    result = {"agreement": 0.4, "balanced_agreement": 0.41}
    assert "below chance" in agreement_lines(result, "F", "40 passages", labels=2)
    assert "below chance" not in agreement_lines(result, "F", "40 passages", labels=4)


def test_demo_copies_its_results(
    cli_env: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--results-json: the run's results.json, copied where the docs' figures are checked from."""
    import weights2data.cli as cli

    tiny = {"dataset": "ag_news_64", "corpus": "wiki_passages_120", "k": 24, "scope": "top:1", "lr": 1e-3}
    monkeypatch.setattr(cli, "DEMO", cli.DEMO | tiny | {"epochs": 1, "eval_rows": 48, "eval_epochs": 1})
    monkeypatch.setattr(cli, "DEMO_MODEL", "tiny-test")
    code, out, _ = run(["demo", "--results-dir", "runs", "--results-json", "out/demo.json"], capsys)
    assert code == 0 and "copied to out/demo.json" in out
    copied = (cli_env / "out" / "demo.json").read_text()
    assert copied == (cli_env / "runs" / "demo" / "results.json").read_text()
    table = json.loads(copied)["table"]
    assert [row["model"] for row in table] == [
        "expert",
        "greedy",
        "topk_balanced@precondition=kfac",
        "topk",
        "random",
    ]


def test_select_hints_at_quotas_when_a_label_has_few_picks() -> None:
    skewed = {"negative": 4, "positive": 96}
    hint = sparse_label_line({"strategy": "greedy", "label_distribution": skewed})
    assert "few picks carry negative" in hint and "--strategy greedy_balanced" in hint
    assert sparse_label_line({"strategy": "greedy_balanced", "label_distribution": skewed}) == ""
    assert sparse_label_line({"strategy": "greedy", "label_distribution": {"a": 40, "b": 60}}) == ""
    assert sparse_label_line({"strategy": "greedy"}) == ""  # a language-model selection: no labels
