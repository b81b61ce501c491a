"""`w2d inspect`: the train scope of head, top:N, full and LoRA finetunes, and the label tokens of a
tiny classifier trained with word labels and a template."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from weights2data.adapters import load_adapter
from weights2data.cli import main
from weights2data.config import FinetuneConfig
from weights2data.data import Split, load_dataset, make_label_set
from weights2data.inspect_model import distinct_words, inspect_finetune, label_count, markdown
from weights2data.models import LoadedModel
from weights2data.templates import Template
from weights2data.train import Task, finetune

REVIEW = Template("Review: {text}\nSentiment:")


@pytest.fixture(scope="module")
def reviews(data_dir) -> tuple[Split, list[str]]:
    train = load_dataset("rotten_tomatoes_64", data_dir=data_dir).train
    corpus = load_dataset("wiki_passages_40", data_dir=data_dir).train.texts
    return train, corpus


def trained(tiny: LoadedModel, train: Split, scope: str, label_loss: str, lr: float) -> LoadedModel:
    labels = make_label_set(["neg", "pos"], tiny.tokenizer, "negative,positive", REVIEW)
    task = Task("classification", 24, labels, template=REVIEW, label_loss=label_loss)
    model = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, f"tiny-{scope}")
    finetune(model, train, task, FinetuneConfig(train_scope=scope, lr=lr, epochs=2, batch_size=16))
    return model


@pytest.mark.parametrize(
    ("scope", "label_loss", "lr"),
    [("head", "restricted", 1e-2), ("top:1", "full", 1e-3), ("full", "full", 1e-3)],
)
def test_inspect_finds_the_scope_and_the_labels(tiny, reviews, scope, label_loss, lr) -> None:
    train, corpus = reviews
    model = trained(tiny, train, scope, label_loss, lr)
    report = inspect_finetune(tiny, model, corpus[:24], REVIEW, 24)
    assert report["scope"] == scope
    assert report["label_set"] in ("negative,positive", "positive,negative")
    assert report["task"]["kind"] == "classification"
    assert {c["token"] for c in report["candidates"][:2]} == {" negative", " positive"}
    assert "| token |" in markdown(report)


def test_inspect_an_lm_finetune(tiny, data_dir, reviews) -> None:
    model = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny-lm")
    texts = load_dataset("wiki_passages_64", data_dir=data_dir).train
    finetune(
        model, texts, Task("lm", 24), FinetuneConfig(train_scope="top:1", lr=1e-3, epochs=2, batch_size=16)
    )
    report = inspect_finetune(tiny, model, reviews[1][:24], REVIEW, 24)
    assert report["scope"] == "top:1" and report["task"]["kind"] == "lm"


def test_inspect_lora(tiny, reviews, make_adapter, tmp_path: Path) -> None:
    adapter = load_adapter(tiny, make_adapter(tiny, tmp_path / "adapter", ["q_proj", "v_proj"]))
    report = inspect_finetune(tiny, adapter, reviews[1][:8], REVIEW, 24)
    assert report["scope"] == "lora" and report["adapter"].startswith("LoRA r=4")
    assert report["task"]["head_concentration"] is None  # the head did not move
    changed = [row["group"] for row in report["changes"] if row["relative_change"] > 0]
    assert changed == ["block 0", "block 1"]


def test_whitespace_variants_are_not_labels() -> None:
    """The 3-epoch LoRA expert's case: 'positive' after ' positive' would make a third label."""
    scores = {" positive": 8.9e8, " negative": 2.1e8, "positive": 5.1e7, "negative": 6.8e6, " Positive": 2e6}
    candidates = [{"token": token, "score": score} for token, score in scores.items()]
    words = distinct_words(candidates)
    assert [c["token"] for c in words] == [" positive", " negative", " Positive"]
    assert label_count([c["score"] for c in words]) == 2
    assert label_count([c["score"] for c in candidates]) == 3  # counting the variants
    assert candidates[2]["variant_of"] == " positive" and "variant_of" not in candidates[4]


def test_label_count_rule() -> None:
    assert label_count([1.0, 0.9, 0.01, 0.009, 0.008]) == 2
    assert label_count([1.0, 0.95, 0.9, 0.85, 0.02, 0.01]) == 4
    assert label_count([1.0, 0.0, 0.0, 0.0]) == 2  # at least two labels


def test_cli_inspect_then_select_discover(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--results-dir", "runs", "--seq-len", "24", "--template", "Review: {text}\\nSentiment:"]
    finetune_args = [
        "finetune",
        "--model",
        "tiny-test",
        "--dataset",
        "rotten_tomatoes_64",
        "--train-scope",
        "head",
    ]
    finetune_args += [
        "--verbalizer",
        "negative,positive",
        "--lr",
        "1e-2",
        "--epochs",
        "2",
        "--exp-name",
        "ft",
    ]
    assert main([*finetune_args, *common]) == 0
    inspect = [
        "inspect",
        "--base",
        "tiny-test",
        "--finetuned",
        "runs/ft/model",
        "--corpus",
        "wiki_passages_40",
    ]
    assert main([*inspect, "--docs", "16", "--exp-name", "ins", *common]) == 0
    report = json.loads((cli_env / "runs" / "ins" / "inspect.json").read_text())
    assert report["scope"] == "head" and report["label_set"] in ("negative,positive", "positive,negative")
    assert (cli_env / "runs" / "ins" / "inspect.md").exists() and "--label-set" in capsys.readouterr().out
    select = ["select", "--base", "tiny-test", "--finetuned", "runs/ft/model", "--corpus", "wiki_passages_40"]
    assert main([*select, "-k", "6", "--label-set", "discover", "--exp-name", "sel", *common]) == 0
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert sorted(summary["label_set"]["tokens"]) == [" negative", " positive"]
    assert sum(summary["label_distribution"].values()) == 6
    assert "probability of the autolabels" in capsys.readouterr().out  # select's report says it


def test_inspect_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(
        flag in out
        for flag in ("--base", "--finetuned", "--corpus", "--docs", "--template", "--chat-template")
    )
