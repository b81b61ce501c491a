"""train + pipeline: losses against hand computations, train scopes, saving, the finetune cache."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from weights2data import train as train_module
from weights2data.config import DataConfig, EvalConfig, FinetuneConfig
from weights2data.data import Split, encode_lm, load_dataset, make_label_set
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, load_model
from weights2data.train import (
    ScopedModel,
    Task,
    balanced_accuracy,
    batch_loss,
    evaluate,
    finetune,
    hold_out,
    lm_loss_sum,
    make_optimizer,
    resolve_task,
    train_eval,
)

TEXTS = [
    "Stocks rallied on Wall Street after the central bank held interest rates steady.",
    "Hi",
    "The home team won the championship in overtime with a late goal from the captain.",
    "New chip promises faster phones",
    "Rebels and government forces agreed to a ceasefire in the capital on Sunday night after talks.",
]
LABELS = np.array([2, 0, 1, 3, 0])
NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def cls_task(loaded, seq_len: int = 16) -> Task:
    return Task("classification", seq_len, make_label_set(NAMES, loaded.tokenizer))


def lm_task(mode: str = "full", seq_len: int = 12) -> Task:
    return Task("lm", seq_len, None, mode)


def full_logits(loaded, enc) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids
        ).logits


def params(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


# ---------------------------------------------------------------- losses by hand


def test_classification_loss_matches_a_hand_computation(tiny) -> None:
    task = cls_task(tiny)
    enc = task.encode(tiny, TEXTS)
    assert enc.input_ids.shape == (5, 15)
    targets = torch.as_tensor(LABELS)
    label_ids = torch.tensor(task.label_set.token_ids)
    z = full_logits(tiny, enc)[:, -1][:, label_ids]  # (B, C): the label tokens only
    log_probs = z - torch.logsumexp(z, dim=-1, keepdim=True)
    expected = -log_probs[torch.arange(5), targets].sum()
    correct = int((z.argmax(-1) == targets).sum())
    for scope in ("full", "head", "top:1"):
        scoped = ScopedModel(tiny, scope, task, training=False)
        with torch.no_grad():
            loss, n, right = batch_loss(scoped, scoped.frozen_outputs(enc, None), enc, targets)
        assert n == 5 and int(right.sum()) == correct
        assert torch.allclose(loss, expected, atol=1e-5), scope


def _hand_lm_loss(logits: torch.Tensor, enc, mode: str) -> tuple[float, int]:
    total, count = 0.0, 0
    for i, length in enumerate(enc.attention_mask.sum(1).tolist()):
        assert (
            enc.attention_mask[i, :length].all() and not enc.attention_mask[i, length:].any()
        )  # right padding
        steps = range(1, length) if mode == "full" else range(max(length - 1, 1), length)
        for t in steps:
            z = logits[i, t - 1]
            total += float(torch.logsumexp(z, 0) - z[enc.input_ids[i, t]])
            count += 1
    return total, count


@pytest.mark.parametrize("mode", ["full", "last"])
def test_lm_loss_matches_a_hand_computation(tiny, mode: str) -> None:
    texts = [*TEXTS, "Hello"]
    enc = encode_lm(tiny.tokenizer, texts, seq_len=12)
    lengths = enc.attention_mask.sum(1).tolist()
    assert (
        min(lengths) == 1 and max(lengths) == 12 and 1 < sorted(lengths)[2] < 12
    )  # padded, full, 1-token rows
    logits = full_logits(tiny, enc)
    expected, count = _hand_lm_loss(logits, enc, mode)
    assert count == (sum(n - 1 for n in lengths) if mode == "full" else sum(n >= 2 for n in lengths))
    loss, n, _ = lm_loss_sum(logits, enc, mode)
    assert n == count and abs(float(loss) - expected) < 1e-4 * max(1.0, abs(expected))
    scoped = ScopedModel(tiny, "full", lm_task(mode), training=False)
    with torch.no_grad():
        loss2, n2, _ = batch_loss(scoped, None, enc, None)
    assert n2 == count and abs(float(loss2) - expected) < 1e-4 * max(1.0, abs(expected))


# ---------------------------------------------------------------- scopes


def test_top1_and_head_logits_from_frozen_features_equal_the_full_model_classification(
    tiny, cache: Path
) -> None:
    task = cls_task(tiny)
    enc = task.encode(tiny, TEXTS)
    expected = full_logits(tiny, enc)[:, -1][:, torch.tensor(task.label_set.token_ids)]
    for scope in ("top:1", "top:2", "head"):
        scoped = ScopedModel(tiny, scope, task)
        for root in (None, cache, cache):  # computed, written to the cache, read back
            frozen = scoped.frozen_outputs(enc, root)
            with torch.no_grad():
                got = scoped.logits(frozen, enc)
            assert got.shape == (5, 4)
            assert torch.allclose(got, expected, atol=1e-5), (scope, root)


def test_top1_logits_from_frozen_features_equal_the_full_model_lm(tiny) -> None:
    task = lm_task()
    enc = task.encode(tiny, TEXTS)
    expected = full_logits(tiny, enc)
    scoped = ScopedModel(tiny, "top:1", task)
    frozen = scoped.frozen_outputs(enc, None)
    assert frozen.shape == (5, 12, tiny.model.config.hidden_size)
    with torch.no_grad():
        got = scoped.logits(frozen, enc)
    real = enc.attention_mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_top_scope_larger_than_the_model(tiny) -> None:
    with pytest.raises(W2DError, match="more blocks"):
        ScopedModel(tiny, "top:3", cls_task(tiny))


def test_head_scope_unties_and_trains_only_the_label_rows(tiny) -> None:
    task = cls_task(tiny)
    before = params(tiny)
    cfg = FinetuneConfig(train_scope="head", lr=1e-2, epochs=3, batch_size=2)
    result = finetune(tiny, Split(TEXTS, LABELS), task, cfg)
    model = tiny.model
    assert result["untied_head"] and not model.config.tie_word_embeddings
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed is not head
    assert torch.equal(embed, before["model.embed_tokens.weight"])
    rows = torch.tensor(task.label_set.token_ids)
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[rows] = False
    assert not torch.allclose(head[rows], embed[rows])
    assert torch.equal(head[others], embed[others])
    for name, value in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(value, before[name]), name
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_head_scope_lm_trains_the_whole_head_only(tiny) -> None:
    before = params(tiny)
    finetune(tiny, Split(TEXTS, None), lm_task(), FinetuneConfig(train_scope="head", lr=1e-2, epochs=2))
    model = tiny.model
    assert torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])
    assert not torch.equal(model.get_output_embeddings().weight, before["model.embed_tokens.weight"])
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before["model.layers.1.mlp.up_proj.weight"])


def test_top1_scope_trains_the_last_block_norm_and_head_only(tiny) -> None:
    before = params(tiny)
    finetune(
        tiny, Split(TEXTS, LABELS), cls_task(tiny), FinetuneConfig(train_scope="top:1", lr=1e-2, epochs=2)
    )
    after = tiny.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.1.") for k in changed)
    assert "lm_head.weight" in changed and "model.norm.weight" in changed
    assert not any(k.startswith("model.layers.0.") or k.startswith("model.embed") for k in changed)


def test_full_scope_finetune_lowers_the_training_loss(tiny, data_dir: Path) -> None:
    train = load_dataset("ag_news_24", data_dir=data_dir).train
    before = params(tiny)
    result = finetune(tiny, train, cls_task(tiny), FinetuneConfig(lr=3e-3, epochs=3, batch_size=8))
    losses = [h["train_loss"] for h in result["history"]]
    assert len(losses) == 3 and result["steps"] == 9
    assert losses[-1] < 0.8 * losses[0]
    after = tiny.model.state_dict()
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not result["untied_head"] and tiny.model.config.tie_word_embeddings


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizers(name: str, cls: type) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([weight], FinetuneConfig(optimizer=name, lr=0.1, weight_decay=0.01))
    assert type(optimizer) is cls
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["weight_decay"] == 0.01
    weight.sum().backward()
    optimizer.step()
    assert (weight < 1).all()


def test_steps_limit(tiny) -> None:
    result = finetune(
        tiny,
        Split(TEXTS, LABELS),
        cls_task(tiny),
        FinetuneConfig(train_scope="head", lr=1e-3, epochs=5, batch_size=2, steps=4),
    )
    assert result["steps"] == 4 and [h["steps"] for h in result["history"]] == [3, 1]


def test_finetune_is_reproducible(tiny) -> None:
    cfg = FinetuneConfig(lr=1e-3, epochs=2, batch_size=3)
    base = tiny.fingerprint
    a, b = tiny, LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.spec)
    for loaded in (a, b):
        finetune(loaded, Split(TEXTS, LABELS), cls_task(loaded), cfg)
    assert a.fingerprint == b.fingerprint != base


def test_diverging_training_is_a_w2d_error(tiny) -> None:
    with pytest.raises(W2DError, match="NaN or inf"):
        finetune(
            tiny, Split(TEXTS, LABELS), cls_task(tiny), FinetuneConfig(lr=1e30, optimizer="sgd", epochs=3)
        )


def test_divergence_in_the_last_step_is_a_w2d_error(tiny) -> None:
    # epoch 1's loss is finite, its step makes the weights inf; epoch 2's loss is still finite
    # (a saturated softmax), so nothing is raised and the model holds inf weights
    with pytest.raises(W2DError, match="NaN or inf"):
        finetune(
            tiny, Split(TEXTS, LABELS), cls_task(tiny), FinetuneConfig(lr=1e30, optimizer="sgd", epochs=2)
        )


def test_empty_and_unlabelled_splits(tiny) -> None:
    with pytest.raises(W2DError, match="empty"):
        finetune(tiny, Split([], LABELS[:0]), cls_task(tiny), FinetuneConfig())
    with pytest.raises(W2DError, match="labelled"):
        finetune(tiny, Split(TEXTS, None), cls_task(tiny), FinetuneConfig())


# ---------------------------------------------------------------- evaluation


def test_evaluate_classification_and_lm(tiny, data_dir: Path, cache: Path) -> None:
    ds = load_dataset("ag_news", data_dir=data_dir)
    task = cls_task(tiny)
    metrics = evaluate(tiny, ds.test, task, EvalConfig(max_eval_rows=40), cache_root=cache)
    assert metrics["n"] == 40 and 0 <= metrics["accuracy"] <= 1
    again = evaluate(tiny, ds.test, task, EvalConfig(max_eval_rows=40, eval_batch_size=7))
    assert again["accuracy"] == metrics["accuracy"] and abs(again["loss"] - metrics["loss"]) < 1e-5
    lm = evaluate(tiny, Split(TEXTS, None), lm_task(), EvalConfig())
    assert lm["tokens"] > 0 and abs(lm["perplexity"] - np.exp(lm["loss"])) < 1e-6 * lm["perplexity"]
    # a random 49k-vocabulary model is near-uniform
    assert abs(lm["loss"] - np.log(tiny.model.config.vocab_size)) < 1.0


def test_evaluating_after_training_in_place_does_not_reuse_stale_hidden_states(
    tiny, data_dir: Path, fresh_cache: Path
) -> None:
    ds = load_dataset("ag_news_32", data_dir=data_dir)
    task, ev = cls_task(tiny), EvalConfig(max_eval_rows=32)
    evaluate(tiny, ds.test, task, ev, cache_root=fresh_cache)
    finetune(tiny, ds.train, task, FinetuneConfig(lr=1e-2, epochs=1, batch_size=16))
    cached = evaluate(tiny, ds.test, task, ev, cache_root=fresh_cache)
    uncached = evaluate(tiny, ds.test, task, ev, cache_root=None)
    assert abs(cached["loss"] - uncached["loss"]) < 1e-5


def test_hold_out() -> None:
    split = Split([f"t{i}" for i in range(100)], np.arange(100) % 3)
    fit, val = hold_out(split, 0.1, seed=0)
    assert (len(fit), len(val)) == (90, 10)
    assert sorted(fit.texts + val.texts) == sorted(split.texts)
    assert hold_out(split, 0.05, seed=0)[1] is None  # fewer than 10 rows: none held out
    assert hold_out(split, 0.1, seed=0)[1].texts == val.texts


def test_train_eval_reports_both_figures(tiny, data_dir: Path, cache: Path) -> None:
    ds = load_dataset("ag_news_120", data_dir=data_dir)
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=50, eval_epochs=3, patience=3)
    result = train_eval(tiny, ds.train, ds.test, cls_task(tiny), ft, ev, cache_root=cache)
    epochs = result["epochs"]
    assert result["metric"] == "accuracy" and len(epochs) == 3
    assert (result["train_rows"], result["val_rows"]) == (108, 12)
    tests = [e["test"]["accuracy"] for e in epochs]
    assert result["best_epoch_test"] == max(tests) == tests[result["best_epoch"] - 1]
    val_losses = [e["val"]["loss"] for e in epochs]
    assert result["val_selected_epoch"] == int(np.argmin(val_losses)) + 1
    assert result["val_selected_test"] == tests[result["val_selected_epoch"] - 1]
    assert result["honest_rule"] == "best validation loss"


def test_honest_figure_never_reads_the_test_set(tiny, data_dir: Path) -> None:
    """The honest epoch and stop are the same whatever the test split; the original's follow the test."""
    ds = load_dataset("ag_news_120", data_dir=data_dir)
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=40, eval_epochs=6, patience=1)
    fresh = lambda: LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny")  # noqa: E731
    results = [
        train_eval(fresh(), ds.train, test, cls_task(tiny), ft, ev)
        for test in (ds.test.subset(np.arange(40)), ds.test.subset(np.arange(40, 80)))
    ]
    for r in results:
        val = [e["val"]["loss"] for e in r["epochs"]]
        stop = next((i + 1 for i in range(len(val)) if i + 1 - (int(np.argmin(val[: i + 1])) + 1) >= 1), 6)
        assert r["honest_stop"] == stop  # the first epoch without a better validation loss
        assert r["val_selected_epoch"] == int(np.argmin(val[:stop])) + 1
        tests = [e["test"]["accuracy"] for e in r["epochs"]]
        assert r["best_epoch_test"] == max(tests[: r["best_epoch_stop"]])
    assert results[0]["honest_stop"] == results[1]["honest_stop"]
    assert results[0]["val_selected_epoch"] == results[1]["val_selected_epoch"]


def test_without_a_validation_split_the_honest_figure_is_the_budgets_last_epoch(tiny, data_dir: Path) -> None:
    ds = load_dataset("ag_news_40", data_dir=data_dir)
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=20, eval_epochs=4, patience=1, val_fraction=0.1)  # 4 rows: none held out
    result = train_eval(tiny, ds.train, ds.test, cls_task(tiny), ft, ev)
    assert result["honest_rule"] == "last epoch" and result["val_rows"] == 0
    assert len(result["epochs"]) == 4 and result["val_selected_epoch"] == result["honest_stop"] == 4


def test_honest_by_agreement_trains_on_every_row_and_picks_the_epoch_by_agreement(
    tiny, data_dir: Path
) -> None:
    ds = load_dataset("ag_news_120", data_dir=data_dir)
    corpus = load_dataset("wiki_passages_60", data_dir=data_dir).train
    reference = Split(corpus.texts + ds.train.texts[:5], np.arange(65) % 4)  # 5 rows the model trains on
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=40, eval_epochs=4, patience=4, honest_by="agreement")
    result = train_eval(tiny, ds.train, ds.test, cls_task(tiny), ft, ev, reference=reference)
    assert (result["train_rows"], result["val_rows"]) == (120, 60)  # no hold-out; its own rows dropped
    agreement = [e["reference"]["accuracy"] for e in result["epochs"]]
    assert result["val_selected_epoch"] == int(np.argmax(agreement)) + 1
    assert result["agreement"] == max(agreement)
    assert result["honest_rule"] == "best agreement with the finetuned model on 60 corpus documents"
    with pytest.raises(W2DError, match="labelled by the finetuned model"):
        train_eval(tiny, ds.train, ds.test, cls_task(tiny), ft, ev)
    with pytest.raises(W2DError, match="unknown honest_by"):
        EvalConfig(honest_by="test")


def test_a_reference_under_the_validation_protocol_is_scored_but_chooses_nothing(
    tiny, data_dir: Path
) -> None:
    ds = load_dataset("ag_news_120", data_dir=data_dir)
    corpus = load_dataset("wiki_passages_60", data_dir=data_dir).train
    reference = Split(corpus.texts, np.arange(60) % 4)
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=40, eval_epochs=4, patience=4, val_fraction=0.2)
    plain, scored = (
        train_eval(
            LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny"),
            ds.train,
            ds.test,
            cls_task(tiny),
            ft,
            ev,
            reference=ref,
        )  # fmt: skip
        for ref in (None, reference)
    )
    for key in ("val_selected_test", "val_selected_epoch", "best_epoch_test", "honest_rule", "val_rows"):
        assert scored[key] == plain[key], key  # the same run: the reference is only looked at
    chosen = scored["epochs"][scored["val_selected_epoch"] - 1]["reference"]
    assert scored["agreement"] == chosen["accuracy"]
    assert scored["balanced_agreement"] == chosen["balanced_accuracy"]
    assert "agreement" not in plain


@pytest.mark.parametrize("scope", ["head", "top:1"])
def test_weight_cos_is_one_where_training_retraces_the_finetune(tiny, data_dir: Path, scope: str) -> None:
    ds = load_dataset("ag_news_40", data_dir=data_dir)
    ft = FinetuneConfig(train_scope=scope, lr=1e-2, batch_size=8, epochs=3)
    fresh = lambda: LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny")  # noqa: E731
    finetuned = fresh()
    finetune(finetuned, ds.train, cls_task(tiny), ft)
    ev = EvalConfig(max_eval_rows=20, eval_epochs=3, patience=3, val_fraction=0.0)  # no hold-out
    result = train_eval(fresh(), ds.train, ds.test, cls_task(tiny), ft, ev, finetuned=finetuned)
    cosines = [e["weight_cos"] for e in result["epochs"]]
    assert cosines[-1] == pytest.approx(1.0, abs=1e-6)  # the same steps: the same weight change
    assert cosines[0] < 0.999 and result["weight_cos"] == cosines[result["val_selected_epoch"] - 1]
    assert "weight_cos" not in train_eval(fresh(), ds.train, ds.test, cls_task(tiny), ft, ev)


def test_values_in_reads_a_tied_head_for_a_student_that_untied_its_own(tiny) -> None:
    finetuned = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny")  # tied, as full keeps it
    task = replace(cls_task(tiny), label_loss="full")  # the student trains its whole (untied) head
    scoped = ScopedModel(tiny, "top:1", task)
    assert scoped.untied and finetuned.model.config.tie_word_embeddings
    names = [name for name, p in tiny.model.named_parameters() if p.requires_grad]
    values = dict(zip(names, scoped.values_in(finetuned), strict=True))
    assert torch.equal(values["lm_head.weight"], finetuned.model.get_input_embeddings().weight)
    assert torch.equal(values["model.norm.weight"], finetuned.model.model.norm.weight)


def test_balanced_accuracy_weighs_every_label_alike() -> None:
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 3])  # label 2 absent: not counted
    correct = torch.tensor([True, True, True, True, False, True, False])
    assert balanced_accuracy(correct, targets) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_train_eval_reuses_the_scores_of_an_identical_run(
    tiny, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    ds = load_dataset("ag_news_40", data_dir=data_dir)
    ft = FinetuneConfig(train_scope="head", lr=1e-2, batch_size=16)
    ev = EvalConfig(max_eval_rows=20, eval_epochs=2, patience=2)
    trained, fresh = (LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny") for _ in range(2))
    first = train_eval(trained, ds.train, ds.test, cls_task(tiny), ft, ev, cache_root=tmp_path)
    assert len(list((tmp_path / "train-eval").glob("*.json"))) == 1

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_module, "train_epoch", no_training)
    assert train_eval(fresh, ds.train, ds.test, cls_task(tiny), ft, ev, cache_root=tmp_path) == first
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another run
        train_eval(fresh, ds.train, ds.test, cls_task(tiny), replace(ft, seed=1), ev, cache_root=tmp_path)


# ---------------------------------------------------------------- tasks


def test_resolve_task(tiny, data_dir: Path) -> None:
    ag = load_dataset("ag_news_10", data_dir=data_dir)
    wiki = load_dataset("wiki_passages_10", data_dir=data_dir)
    assert resolve_task(DataConfig(), ag, tiny).kind == "classification"
    assert resolve_task(DataConfig(), wiki, tiny).kind == "lm"
    assert resolve_task(DataConfig(task="lm"), ag, tiny).kind == "lm"
    with pytest.raises(W2DError, match="no labels"):
        resolve_task(DataConfig(task="classification"), wiki, tiny)
    with pytest.raises(W2DError, match="Sci/Tech"):
        resolve_task(DataConfig(verbalizer="names"), ag, tiny)
    task = resolve_task(DataConfig(seq_len=8), ag, tiny)
    assert Task.from_dict(task.to_dict()) == task


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_head_probe_beats_chance(cache: Path, data_dir: Path) -> None:
    loaded = load_model("smollm2-135m", cache=cache)
    assert loaded.model.config.hidden_size == 576 and loaded.model.config.tie_word_embeddings
    ds = load_dataset("ag_news_200", data_dir=data_dir)
    task = resolve_task(DataConfig(seq_len=16), ds, loaded)  # 16 tokens: half the cost of the default 32
    assert task.label_set.tokens == [" A", " B", " C", " D"]
    body = loaded.body_fingerprint
    result = finetune(
        loaded, ds.train, task, FinetuneConfig(train_scope="head", lr=1e-3, epochs=3), cache_root=cache
    )
    assert result["untied_head"] and loaded.body_fingerprint == body  # the body is untouched
    metrics = evaluate(loaded, ds.test, task, EvalConfig(max_eval_rows=200), cache_root=cache)
    assert metrics["n"] == 200
    assert metrics["accuracy"] > 0.4, metrics  # chance is 0.25
    print(f"smollm2-135m head probe on ag_news_200 (seq len 16): {metrics}")
