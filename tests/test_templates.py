"""Prompt and chat templates: tokens, truncation, label tokens, the full-vocabulary loss, and a template
round trip through finetune → select → train-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from weights2data.cli import main
from weights2data.data import Split, encode_classification, encode_lm, make_label_set, scored_positions
from weights2data.errors import W2DError
from weights2data.templates import Template, encode, resolve_template
from weights2data.train import ScopedModel, Task, batch_loss, prepare

REVIEW = "Review: {text}\nSentiment:"
TEXTS = ["A warm, funny and moving film.", "Dull.", "one two three four five six seven eight nine ten eleven"]


def real_tokens(encoded, row: int) -> list[int]:
    return encoded.input_ids[row][encoded.attention_mask[row].bool()].tolist()


def chat_ids(tokenizer, messages: list[dict], **options) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **options)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_plain_template_is_the_original_format(tokenizer) -> None:
    for kind, original in (("classification", encode_classification), ("lm", encode_lm)):
        ours, theirs = encode(Template(), tokenizer, TEXTS, 8, kind), original(tokenizer, TEXTS, 8)
        assert torch.equal(ours.input_ids, theirs.input_ids)
        assert torch.equal(ours.attention_mask, theirs.attention_mask)


def test_text_template_tokens_and_truncation(tokenizer) -> None:
    template = Template(REVIEW)
    wide = encode(template, tokenizer, TEXTS, 64, "classification")
    for row, text in enumerate(TEXTS):  # untruncated: the tokens of the whole prompt string
        assert real_tokens(wide, row) == tokenizer.encode(
            REVIEW.replace("{text}", text), add_special_tokens=False
        )
    narrow = encode(template, tokenizer, TEXTS, 12, "classification")
    decoded = tokenizer.decode(real_tokens(narrow, 2))
    assert decoded.startswith("Review:") and decoded.endswith("eleven\nSentiment:")  # the text's start is cut
    assert "one" not in decoded and narrow.input_ids.shape[1] == 11
    with pytest.raises(W2DError, match="no room for the text"):
        encode(template, tokenizer, TEXTS, 6, "classification")


def test_lm_template_scores_only_the_completion(tokenizer) -> None:
    encoded = encode(Template("### Answer:\n{text}"), tokenizer, TEXTS, 10, "lm")
    prefix = len(tokenizer.encode("### Answer:\n", add_special_tokens=False))
    assert not encoded.target_mask[:, :prefix].any() and encoded.target_mask[0, prefix:].all()
    scored = scored_positions(encoded.attention_mask, "full", encoded.target_mask)
    assert not scored[:, : prefix - 1].any() and scored[0, prefix - 1 : -1].all()
    last = scored_positions(encoded.attention_mask, "last", encoded.target_mask)
    assert last.sum(1).tolist() == [1, 1, 1] and last[1, int(encoded.attention_mask[1].sum()) - 2]
    assert tokenizer.decode(real_tokens(encoded, 2)).startswith("### Answer:\none two")  # the end is cut


def test_chat_template_is_apply_chat_template(tokenizer) -> None:
    template = Template(chat=True)
    labels = make_label_set(["neg", "pos"], tokenizer, "negative,positive", template)
    assert labels.tokens == ["negative", "positive"]  # the assistant turn starts a line: no space
    encoded = encode(template, tokenizer, TEXTS, 64, "classification")
    for row, text in enumerate(TEXTS):
        conversation = [{"role": "user", "content": text}, {"role": "assistant", "content": "positive"}]
        expected = chat_ids(tokenizer, conversation)
        prompt = real_tokens(encoded, row)
        assert prompt + [labels.token_ids[1]] == expected[: len(prompt) + 1]
        assert prompt == chat_ids(tokenizer, conversation[:1], add_generation_prompt=True)
    lm = encode(template, tokenizer, TEXTS[:1], 64, "lm")
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": TEXTS[0]}]
    assert real_tokens(lm, 0) == chat_ids(tokenizer, turns)
    completion = tokenizer.decode(lm.input_ids[0][lm.target_mask[0]])
    assert completion.startswith(TEXTS[0]) and "user" not in completion


def test_label_tokens_follow_the_template(tokenizer) -> None:
    assert make_label_set(["neg", "pos"], tokenizer, "negative,positive", Template(REVIEW)).tokens == [
        " negative",
        " positive",
    ]
    assert make_label_set(["a", "b"], tokenizer, "A,B", Template("Q: {text}\nA:\n")).tokens == ["A", "B"]
    with pytest.raises(W2DError, match="merges with the end of the prompt"):  # "A: " + "A" is ": A"
        make_label_set(["a", "b"], tokenizer, "A,B", Template("Q: {text}\nA: "))
    with pytest.raises(W2DError, match=r"'Sci/Tech'.*3 tokens.*--label-set discover"):
        make_label_set(["World", "Sci/Tech"], tokenizer, "names", Template(REVIEW))


def test_resolve_template(tmp_path: Path) -> None:
    assert resolve_template("Review: {text}\\nSentiment:", False).text == REVIEW  # typed in a shell
    (tmp_path / "t.txt").write_text(REVIEW + "\n")
    assert resolve_template(str(tmp_path / "t.txt"), False).text == REVIEW  # the editor's newline dropped
    meta = {"task": {"template": {"text": REVIEW, "chat": False}}}
    assert resolve_template(None, False, meta).text == REVIEW and resolve_template(None, False).plain
    assert resolve_template(None, True, meta).chat
    with pytest.raises(W2DError, match="exactly one"):
        Template("no slot")
    task = Task("classification", 16, template=Template(REVIEW), label_loss="full")
    assert Task.from_dict(task.to_dict()) == task
    assert "template" not in Task("classification", 16).to_dict()  # default tasks keep their cache keys


def test_full_vocabulary_loss_trains_the_whole_head(tiny) -> None:
    template = Template(REVIEW)
    labels = make_label_set(["neg", "pos"], tiny.tokenizer, "negative,positive", template)
    task = Task("classification", 16, labels, template=template, label_loss="full")
    scoped = ScopedModel(tiny, "head", task)
    assert scoped.label_rows is None and scoped.head.weight.requires_grad
    data = prepare(scoped, Split(TEXTS, torch.tensor([1, 0, 1]).numpy()), None)
    loss, n, _ = batch_loss(scoped, *data.batch(torch.arange(3)))
    hidden = tiny.model.base_model(
        input_ids=data.encoded.input_ids, attention_mask=data.encoded.attention_mask,
        position_ids=data.encoded.position_ids,
    ).last_hidden_state[:, -1]  # fmt: skip
    expected = F.cross_entropy(
        tiny.model.lm_head(hidden), torch.tensor(labels.token_ids)[[1, 0, 1]], reduction="sum"
    )
    assert n == 3 and torch.allclose(loss, expected, atol=1e-4)


def test_template_round_trip(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    """finetune --template records it; select reads it from w2d.json; train-eval uses it again."""
    common = ["--results-dir", "runs", "--seq-len", "24"]
    flags = ["--template", "Review: {text}\\nSentiment:", "--verbalizer", "negative,positive"]
    finetune = [
        "finetune",
        "--model",
        "tiny-test",
        "--dataset",
        "rotten_tomatoes_48",
        "--train-scope",
        "top:1",
    ]
    assert main([*finetune, *flags, "--label-loss", "full", "--exp-name", "ft", *common]) == 0
    meta = json.loads((cli_env / "runs" / "ft" / "model" / "w2d.json").read_text())
    assert meta["task"]["template"]["text"] == REVIEW and meta["task"]["label_loss"] == "full"
    assert meta["task"]["label_set"]["tokens"] == [" negative", " positive"]
    select = ["select", "--base", "tiny-test", "--finetuned", "runs/ft/model", "--corpus", "wiki_passages_40"]
    assert main([*select, "-k", "8", "--exp-name", "sel", *common]) == 0
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert summary["template"] == repr(REVIEW) and summary["label_loss"] == "full"
    assert summary["label_set"]["tokens"] == [" negative", " positive"]
    table = pq.read_table(cli_env / "runs" / "sel" / "selection.parquet")
    assert table.num_rows == 8 and set(table.column("label_name").to_pylist()) <= {"neg", "pos"}
    train_eval = ["train-eval", "--model", "tiny-test", "--train", "runs/sel/selection.parquet"]
    train_eval += ["--dataset", "rotten_tomatoes", "--eval-epochs", "1", "--max-eval-rows", "32"]
    assert main([*train_eval, *flags, "--label-loss", "full", "--exp-name", "te", *common]) == 0
    assert "honest" in capsys.readouterr().out


def test_run_with_a_template(cli_env: Path) -> None:
    """`w2d run`: the expert, the selection and every compared model read the same template and loss."""
    argv = ["run", "--model", "tiny-test", "--dataset", "rotten_tomatoes_48", "-k", "8"]
    argv += ["--select_seed_dataset", "wiki_passages_40", "--strategies", "greedy", "--skip-similarity"]
    argv += ["--eval-epochs", "1", "--max-eval-rows", "32", "--results_dir", "runs", "--train-scope", "top:1"]
    argv += [
        "--seq-len",
        "24",
        "--template",
        "Review: {text}\\nSentiment:",
        "--verbalizer",
        "negative,positive",
    ]
    argv += ["--label-loss", "full"]
    assert main([*argv, "--exp_name", "tpl"]) == 0
    results = json.loads((cli_env / "runs" / "tpl" / "results.json").read_text())
    assert results["selections"]["greedy"]["template"] == repr(REVIEW)
    assert results["selections"]["greedy"]["label_loss"] == "full"
    assert [row["model"] for row in results["table"]] == ["expert", "greedy", "random"]
