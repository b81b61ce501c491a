"""Defences: what each does to the weights and the outputs, the saved directory, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from weights2data.cli import main
from weights2data.config import DataConfig, DefenseConfig, FinetuneConfig, to_dict
from weights2data.data import load_dataset
from weights2data.defend import (
    as_rows,
    defend,
    outputs,
    public_states,
    vocab_logits,
)
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, load_model
from weights2data.train import ScopedModel, Task, finetune, resolve_task
from weights2data.trajectory import paired_weights

RUN = [
    "run", "--model", "tiny-test", "--dataset", "ag_news_64", "--select_seed_dataset", "wiki_passages_120",
    "-k", "16", "--eval-epochs", "2", "--max-eval-rows", "48", "--batch-size", "16", "--skip-similarity",
    "--train-scope", "top:1", "--lr", "1e-3", "--results_dir", "runs",
]  # fmt: skip


@pytest.fixture(scope="module")
def texts(data_dir) -> dict:
    """A few AG News rows to finetune on and Wikipedia passages as the public text."""
    news = load_dataset("ag_news_48", data_dir=data_dir)
    return {"news": news, "public": load_dataset("wiki_passages_40", data_dir=data_dir).train}


def finetune_tiny(tiny: LoadedModel, dataset, kind: str) -> LoadedModel:
    """A top:1 finetune of the tiny model (a classifier, or language modelling), with its metadata."""
    task = resolve_task(DataConfig(seq_len=16, task=kind), dataset, tiny)
    model = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, "tiny-finetuned")
    cfg = FinetuneConfig(train_scope="top:1", lr=1e-2, steps=4, batch_size=8).for_task(task.kind)
    result = finetune(model, dataset.train, task, cfg)
    model.meta = {"task": task.to_dict(), "finetune": to_dict(cfg), "history": result["history"]}
    return model


@pytest.fixture(scope="module")
def classifier(cache, texts) -> tuple[LoadedModel, LoadedModel]:
    """The tiny base and a top:1 classifier finetune of it."""
    base = load_model("tiny-test", cache=cache)
    return base, finetune_tiny(base, texts["news"], "classification")


def pairs(base: LoadedModel, model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (p.detach(), start) for name, p, start in paired_weights(base, model)}


def label_kl(a: LoadedModel, b: LoadedModel, texts: list[str], task: Task) -> float:
    """Mean KL(a ‖ b) of the label distributions at the last position over `texts`."""
    encoded = task.encode(a, texts)
    with torch.no_grad():
        log_p = [outputs(ScopedModel(m, "full", task, training=False), None, encoded)[1] for m in (a, b)]
    return float(F.kl_div(log_p[1], log_p[0], log_target=True, reduction="batchmean"))


def test_absolute_noise_has_rms_strength_on_every_weight(classifier) -> None:
    _, finetuned = classifier
    defended, _ = defend(finetuned, DefenseConfig(method="noise", strength=0.01))
    noise = torch.cat([(p - q).flatten() for _, (p, q) in pairs(finetuned, defended.model).items()])
    assert noise.square().mean().sqrt().item() == pytest.approx(0.01, rel=0.01)
    assert all((p != q).all() for p, q in pairs(finetuned, defended.model).values())
    again, _ = defend(finetuned, DefenseConfig(method="noise", strength=0.01))
    other, _ = defend(finetuned, DefenseConfig(method="noise", strength=0.01, seed=1))
    for (name, p), q, r in zip(
        defended.model.named_parameters(), again.model.parameters(), other.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name  # seeded: the same weights again
        assert not torch.equal(p, r), name


def test_relative_noise_is_scaled_to_the_update_and_spares_what_it_did_not_change(classifier) -> None:
    base, finetuned = classifier
    defended, stats = defend(finetuned, DefenseConfig(method="relative-noise", strength=0.5), base=base)
    update, noised = pairs(base, finetuned.model), pairs(finetuned, defended.model)
    changed = 0
    for name, (tuned, start) in update.items():
        delta, noise = as_rows(tuned - start), as_rows(noised[name][0] - tuned)
        rows = delta.ne(0).any(1)
        assert torch.equal(noise[~rows], torch.zeros_like(noise[~rows])), name  # untouched rows stay exact
        if rows.any():
            changed += 1
            expected = 0.5 * delta[rows].square().mean().sqrt()
            rms = noise[rows].square().mean().sqrt()
            assert rms.item() == pytest.approx(
                expected.item(), rel=0.25 if noise[rows].numel() < 300 else 0.06
            )
    assert stats["noised_tensors"] == changed
    # the embeddings and block 0 were frozen by the top:1 finetune, the head changed in its label rows only
    assert all(torch.equal(*noised[n]) for n in noised if n.startswith(("model.embed", "model.layers.0.")))
    assert 0 < changed < len(update)
    assert stats["moved"] == pytest.approx(0.5 * stats["update"], rel=0.1)


def test_retrain_keeps_the_outputs_while_the_weights_move(classifier, texts) -> None:
    base, finetuned = classifier
    task, public = Task.from_dict(finetuned.meta["task"]), texts["public"]
    cfg = DefenseConfig(method="retrain", strength=0.1)
    defended, stats = defend(finetuned, cfg, base, public, task)
    loose, _ = defend(
        finetuned, DefenseConfig(method="retrain", strength=0.1, kl_weight=0.0), base, public, task
    )
    assert stats["steps"] == 10 and stats["scope"] == "top:1"
    assert stats["lm_loss_last"] < stats["lm_loss_first"]  # it trained on the public text
    assert stats["moved"] > 0.2 * stats["update"]
    kl, kl_free = (label_kl(finetuned, m, public.texts, task) for m in (defended, loose))
    assert kl < 0.05 and kl < kl_free / 3
    before, after = pairs(finetuned, defended.model), dict(defended.model.named_parameters())
    head = after["lm_head.weight"] - before["lm_head.weight"][1]
    others = torch.ones(len(head), dtype=torch.bool)
    others[task.label_set.token_ids] = False
    assert torch.equal(head[others], torch.zeros_like(head[others]))  # the head moves in its label rows only
    assert all(torch.equal(*before[n]) for n in before if n.startswith(("model.embed", "model.layers.0.")))


def test_head_obfuscation_moves_the_head_within_the_penalty(classifier, texts) -> None:
    base, finetuned = classifier
    task, public = Task.from_dict(finetuned.meta["task"]), texts["public"]
    cfg = DefenseConfig(method="head-obfuscate", strength=0.05, steps=100)
    defended, stats = defend(finetuned, cfg, base, public, task)
    ids = task.label_set.token_ids
    w, w_new = (m.model.get_output_embeddings().weight.detach()[ids] for m in (finetuned, defended))
    moved = float((w_new - w).norm() / w.norm())
    assert moved == pytest.approx(stats["head_moved"]) and moved > 0.3
    hidden = public_states(finetuned, base, public.texts, task, None)  # (N, d) at the last position
    log_p, log_q = F.log_softmax(hidden @ w.T, -1), F.log_softmax(hidden @ w_new.T, -1)
    kl = float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    assert kl == pytest.approx(stats["kl"], abs=1e-6)
    assert kl <= cfg.strength * moved + 1e-6  # the best iterate is no worse than the start: KL ≤ S · move
    changed = {n for n, (p, q) in pairs(finetuned, defended.model).items() if not torch.equal(p, q)}
    assert changed == {"lm_head.weight"}


def test_language_model_defences(tiny, texts) -> None:
    """A next-token finetune: retrain's KL is over next tokens, head-obfuscate moves the whole head."""
    finetuned = finetune_tiny(tiny, texts["news"], "lm")
    task = Task.from_dict(finetuned.meta["task"])
    _, stats = defend(finetuned, DefenseConfig(method="retrain", steps=5), tiny, texts["public"], task)
    assert stats["steps"] == 5 and stats["kl_last"] >= 0
    _, stats = defend(finetuned, DefenseConfig(method="head-obfuscate", steps=3), None, texts["public"], task)
    assert 0 < stats["kl"] <= 0.1 * stats["head_moved"] + 1e-6


def test_bad_inputs(classifier) -> None:
    base, finetuned = classifier
    with pytest.raises(W2DError, match="--base"):
        defend(finetuned, DefenseConfig(method="relative-noise"))
    with pytest.raises(W2DError, match="--corpus"):
        defend(finetuned, DefenseConfig(method="retrain"), base)
    with pytest.raises(W2DError, match="no defence"):
        defend(finetuned, DefenseConfig())
    with pytest.raises(W2DError, match="unknown defense 'gaussian'"):
        DefenseConfig(method="gaussian")
    with pytest.raises(W2DError, match="strength"):
        DefenseConfig(method="noise", strength=0)
    with pytest.raises(W2DError, match="without a method"):
        DefenseConfig(strength=0.1)
    assert DefenseConfig(method="retrain", strength=2.5).optimiser_steps == 250
    assert DefenseConfig(method="noise").strength == 0.01


def test_vocab_logits_put_the_trained_label_rows_in_place(classifier) -> None:
    _, finetuned = classifier
    task = Task.from_dict(finetuned.meta["task"])
    scoped = ScopedModel(LoadedModel(copy.deepcopy(finetuned.model), finetuned.tokenizer, "x"), "top:1", task)
    with torch.no_grad():
        scoped.label_rows += 1.0
    hidden = torch.randn(3, 64)
    logits = vocab_logits(scoped, hidden)
    torch.testing.assert_close(logits[:, task.label_set.token_ids], hidden @ scoped.label_rows.T)


def test_defend_command_writes_a_finetune_that_select_reads(cli_env) -> None:
    assert main(["finetune", "--model", "tiny-test", "--dataset", "ag_news_32", "--train-scope", "top:1",
                 "--lr", "1e-2", "--results-dir", "runs", "--exp-name", "ft"]) == 0  # fmt: skip
    args = ["defend", "--model", "runs/ft/model", "--base", "tiny-test", "--corpus", "wiki_passages_40",
            "--method", "retrain", "--steps", "3", "--results-dir", "runs", "--exp-name", "def"]  # fmt: skip
    assert main(args) == 0
    defended = load_model(str(cli_env / "runs" / "def" / "model"), cache=cli_env / "cache")
    original = load_model(str(cli_env / "runs" / "ft" / "model"), cache=cli_env / "cache")
    assert defended.meta["task"] == original.meta["task"]  # the label set travels with the model
    assert defended.meta["defense"]["method"] == "retrain" and defended.meta["defense"]["steps"] == 3
    metrics = json.loads((cli_env / "runs" / "def" / "metrics.json").read_text())
    assert metrics["defense"]["moved"] > 0
    assert main(args[:-1] + ["def2"]) == 0  # the same defence again: the saved model is reused
    assert (cli_env / "runs" / "def2" / "model").resolve() == (cli_env / "runs" / "def" / "model").resolve()
    select = ["select", "--base", "tiny-test", "--finetuned", "runs/def/model", "-k", "8"]
    assert main([*select, "--corpus", "wiki_passages_60", "--results-dir", "runs", "--exp-name", "sel"]) == 0
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert sum(summary["label_distribution"].values()) == 8


def test_run_with_a_defence_reports_its_utility(cli_env, capsys) -> None:
    assert main([*RUN, "--defense", "noise", "--defense-strength", "0.01", "--exp_name", "noisy"]) == 0
    assert "the defended expert's own test accuracy" in capsys.readouterr().out
    results = json.loads((cli_env / "runs" / "noisy" / "results.json").read_text())
    record = results["defense"]
    assert (record["method"], record["strength"]) == ("noise", 0.01)
    assert 0 <= record["utility"]["accuracy"] <= 1 and "accuracy" in record["undefended"]
    assert results["config"]["defense"]["method"] == "noise"
    assert main([*RUN, "--exp_name", "plain"]) == 0  # the same expert, undefended: the reference line
    assert main(["report", "runs/plain", "runs/noisy", "--out", "rep"]) == 0
    report = (cli_env / "rep" / "report.md").read_text()
    assert "Defences: utility against recovery" in report and "| noise | 0.0100 |" in report
    assert (cli_env / "rep" / "defences.png").exists()


@pytest.mark.parametrize("command", ["defend", "run"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    flags = ["--method", "--strength", "--base", "--corpus", "--kl-weight", "--steps"]
    for flag in flags if command == "defend" else ["--defense", "--defense-strength", "--defense-kl-weight"]:
        assert flag in out, flag
