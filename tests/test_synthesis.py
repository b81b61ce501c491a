"""Synthesis (GCG, GCGA, ADMM): token gradients against autograd, ADMM's descent, never worse than SELECT."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import weights2data.synthesis as synthesis
from conftest import nudged
from weights2data.cli import main
from weights2data.config import DataConfig, SelectConfig, SynthConfig
from weights2data.data import make_label_set
from weights2data.errors import W2DError
from weights2data.models import LoadedModel
from weights2data.precondition import Metric
from weights2data.recover import Recovery, corpus_gradients, recover
from weights2data.synthesis import (
    SYNTHESISED,
    augmented_lagrangian,
    cosine,
    gcg_step,
    make_problem,
    objective_grad,
    project,
    sample_swaps,
    scored,
    step_generator,
    synthesise,
    token_gradients,
    x_step,
)
from weights2data.train import Task

TEXTS = [
    "The market rallied after the central bank held rates steady on Tuesday.",
    "The striker scored twice as the home side won the cup final.",
    "A new chip promises faster phones and longer battery life.",
    "Rebels and the army agreed to a ceasefire in the northern province.",
    "Shares of the carmaker fell after it cut its profit forecast.",
    "The coach praised his young team after a narrow win in overtime.",
    "Scientists found water ice near the moon's south pole.",
    "Talks on the trade deal stalled over farm subsidies.",
    "The river flooded the old town for the second time this year.",
    "Astronomers measured the mass of a distant galaxy cluster.",
    "Voters in the city chose a new mayor on Sunday.",
    "The company opened a factory that will employ two thousand people.",
]
SEQ_LEN = 12


@pytest.fixture
def pair(tiny: LoadedModel) -> tuple[LoadedModel, LoadedModel]:
    """The tiny model and a 'finetune' of it: every weight nudged."""
    return tiny, nudged(tiny, 0.02)


@pytest.fixture
def task(tiny: LoadedModel) -> Task:
    labels = make_label_set(["World", "Sports", "Business", "Sci/Tech"], tiny.tokenizer)
    return Task("classification", SEQ_LEN, labels)


def select_init(pair, task: Task, k: int = 4, precondition: str = "none") -> tuple[Recovery, Metric | None]:
    """SELECT's picks from TEXTS, with their objective as SELECT reports it, and the corpus's
    preconditioner the synthesisers take from it."""
    base, tuned = pair
    data = DataConfig(seq_len=SEQ_LEN)
    sel = SelectConfig(k=k, precondition=precondition)
    grads = corpus_gradients(base, tuned, TEXTS, task.label_set, data, sel, None)
    return recover(grads, TEXTS, task.label_set, sel, progress=False), grads.metric


@pytest.mark.parametrize("precondition", ["none", "adam", "kfac"])
def test_token_gradients_equal_autograd_on_one_hot(pair, task: Task, precondition: str) -> None:
    base, tuned = pair
    problem = make_problem(base, tuned, task, metric=select_init(pair, task, precondition=precondition)[1])
    docs = scored(problem, TEXTS[:3])
    active = torch.tensor([0, 2])
    rest = docs.total(torch.tensor([1]))
    ours = token_gradients(problem, docs, active, rest)  # (2, T, V)

    embeddings = problem.embeddings
    one_hot = F.one_hot(docs.ids[active], embeddings.shape[0]).float().requires_grad_()
    errors, hidden, _ = problem.forward(one_hot @ embeddings, docs.mask[active])
    cosine(rest + errors.T @ hidden, problem.delta).backward()
    # float32 sums in a different order: agreement to 1e-5 of the largest entry (kfac's whitening
    # scales these gradients to hundreds, where a fixed atol would test only the summation order)
    torch.testing.assert_close(ours, one_hot.grad, atol=1e-5 * ours.abs().max().item(), rtol=1e-4)
    mask = docs.mask[active].bool()
    assert torch.equal(ours.topk(16, -1).indices[mask], one_hot.grad.topk(16, -1).indices[mask])


def test_batched_objective_gradient_equals_one_pass(pair, task: Task) -> None:
    problem = make_problem(*pair, task)
    docs = scored(problem, TEXTS[:5])
    embeds, rest = problem.embeddings[docs.ids], torch.zeros_like(problem.delta)
    value, grad = objective_grad(problem, embeds, docs.mask, rest)  # one pass, all five
    batched = objective_grad(
        replace(problem, batch_size=2), embeds, docs.mask, rest
    )  # ∂cos/∂G, then 3 passes
    assert batched[0] == pytest.approx(value, abs=1e-6)
    # float32 sums in another order: elements near zero differ by rounding of the largest ones
    torch.testing.assert_close(batched[1], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("precondition", ["none", "adam", "kfac"])
def test_objective_matches_select(pair, task: Task, precondition: str) -> None:
    init, metric = select_init(pair, task, precondition=precondition)
    assert (metric is None) == (precondition == "none")
    problem = make_problem(*pair, task, metric=metric)
    start = scored(problem, init.texts)
    assert start.objective(problem.delta) == pytest.approx(init.summary["objective_cos"], abs=1e-5)
    assert torch.equal(start.labels, init.labels)
    if metric is not None:  # a different objective from the raw one
        raw = make_problem(*pair, task)
        assert scored(raw, init.texts).objective(raw.delta) != pytest.approx(start.objective(problem.delta))


def test_admm_steps_decrease_the_augmented_lagrangian(pair, task: Task) -> None:
    problem = make_problem(*pair, task)
    docs = scored(problem, TEXTS[:4])
    cfg = SynthConfig(method="ADMM", rho=0.5, lr_tokens=1e-3, inner_steps=3)
    x = problem.embeddings[docs.ids] + 0.01 * torch.randn(docs.ids.shape + (problem.embeddings.shape[1],))
    dual = 0.01 * torch.randn_like(x) * docs.mask[..., None]
    z = docs.ids

    def lagrangian(x, z):
        return augmented_lagrangian(problem, x, z, dual, docs.mask, cfg.rho)

    before = lagrangian(x, z)
    x = x_step(problem, x, z, dual, docs.mask, cfg)
    after_x = lagrangian(x, z)
    z = project(problem, x + dual / cfg.rho, docs.mask, docs.ids)
    after_z = lagrangian(x, z)
    assert after_x < before and after_z <= after_x + 1e-6


def test_projection_is_the_nearest_allowed_token(pair, task: Task) -> None:
    problem = make_problem(*pair, task)
    docs = scored(problem, TEXTS[:2])
    x = problem.embeddings[docs.ids] + 0.05 * torch.randn(docs.ids.shape + (problem.embeddings.shape[1],))
    z = project(problem, x, docs.mask, docs.ids)
    distances = torch.cdist(x.reshape(-1, x.shape[-1]), problem.embeddings).masked_fill(
        ~problem.allowed, torch.inf
    )
    expected = torch.where(docs.mask.bool(), distances.argmin(1).view(docs.mask.shape), docs.ids)
    assert torch.equal(z, expected)


def test_fluent_tokens_are_the_base_models_likeliest_after_each_prefix(pair, task: Task) -> None:
    base, _ = pair
    problem = make_problem(*pair, task)
    docs = scored(problem, TEXTS[:3])  # left-padded, of different lengths
    m = 5
    fluent = problem.fluent(docs.ids, docs.mask, m)
    for i in range(3):
        real = docs.ids[i][docs.mask[i].bool()]  # the document alone, unpadded
        start = len(docs.ids[i]) - len(real)
        assert torch.equal(fluent[i, start], problem.allowed)  # the first token is free
        logits = base.model(input_ids=real[None]).logits[0].masked_fill(~problem.allowed, -torch.inf)
        for t in range(1, len(real)):
            expected = torch.zeros_like(problem.allowed)
            expected[logits[t - 1].topk(m).indices] = True
            assert torch.equal(fluent[i, start + t], expected)
    assert torch.equal(problem.fluent(docs.ids, docs.mask, 0)[1, -1], problem.allowed)
    # GCG's swaps and ADMM's projection write only those tokens
    grads = torch.randn(docs.ids.shape + problem.allowed.shape)
    doc, pos, token = sample_swaps(grads, docs.mask, fluent, m, 64, torch.Generator().manual_seed(0))
    assert fluent[doc, pos, token].all() and docs.mask[doc, pos].bool().all()
    x = problem.embeddings[docs.ids] + 0.05 * torch.randn(docs.ids.shape + (problem.embeddings.shape[1],))
    z = project(problem, x, docs.mask, docs.ids, fluent)
    inside = fluent.gather(-1, z[..., None])[..., 0]
    assert inside[docs.mask.bool()].all()
    assert not torch.equal(z, project(problem, x, docs.mask, docs.ids))  # the constraint binds


FLUENT_MULTI = {"fluent_tokens": 8, "swaps_per_step": 2}
PUBLISHED = {"fluent_tokens": 0, "swaps_per_step": 1}  # Zou et al.'s GCG: any token, the best swap
BY_DOCUMENT = {"admm_keep": "documents"}


@pytest.mark.parametrize(("method", "precondition", "options"), [
    ("GCG", "none", PUBLISHED), ("GCGA", "none", PUBLISHED), ("ADMM", "none", PUBLISHED),
    ("GCG", "adam", PUBLISHED), ("ADMM", "adam", PUBLISHED), ("GCG", "adam", {}),
    ("GCG", "adam", FLUENT_MULTI), ("GCGA", "adam", FLUENT_MULTI), ("ADMM", "adam", FLUENT_MULTI),
    ("ADMM", "adam", PUBLISHED | BY_DOCUMENT), ("ADMM", "none", FLUENT_MULTI | BY_DOCUMENT),
])  # fmt: skip
def test_never_worse_than_select(
    pair, task: Task, method: str, precondition: str, options: dict, tmp_path
) -> None:
    init, metric = select_init(pair, task, precondition=precondition)
    cfg = SynthConfig(
        method=method, steps=3, doc_steps=2, topk=8, search_width=16, inner_steps=2, swap_docs=2, **options
    )
    out = synthesise(*pair, init, task, cfg, tmp_path, progress=False, metric=metric)
    assert out.summary["objective_cos"] >= init.summary["objective_cos"] - 1e-5
    assert out.summary["objective_init"] == pytest.approx(init.summary["objective_cos"], abs=1e-5)
    assert len(out.texts) == 4 and out.labels.shape == (4,)
    assert "label_confidence" in init.summary and "label_confidence" not in out.summary  # not of rewrites
    # the reported objective is that of the texts, tokenised again
    problem = make_problem(*pair, task, metric=metric)
    assert scored(problem, out.texts).objective(problem.delta) == pytest.approx(
        out.summary["objective_cos"], abs=1e-5
    )
    for text, source, original in zip(out.texts, out.sources, init.texts, strict=True):
        assert (source == SYNTHESISED) == (text != original)


def test_gcg_improves_and_resumes_where_it_stopped(pair, task: Task, tmp_path, monkeypatch) -> None:
    init, _ = select_init(pair, task)
    cfg = SynthConfig(method="GCG", steps=4, topk=64, search_width=64, swap_docs=0, save_every=2)
    whole = synthesise(*pair, init, task, cfg, None, progress=False)
    assert whole.summary["objective_cos"] > init.summary["objective_cos"] and SYNTHESISED in whole.sources
    real_step, calls = synthesis.gcg_step, []

    def step(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during step 3, after the state of step 2 was saved
        calls.append(1)
        time.sleep(0.1)
        return real_step(*args)

    monkeypatch.setattr(synthesis, "gcg_step", step)
    with pytest.raises(KeyboardInterrupt):
        synthesise(*pair, init, task, cfg, tmp_path, progress=False)
    calls.clear()
    resumed = synthesise(*pair, init, task, cfg, tmp_path, progress=False)
    assert len(calls) == 2 and resumed.texts == whole.texts  # steps 2 and 3, the same swaps
    assert resumed.summary["synth_s"] >= 0.4  # the killed run's two saved steps count, and its own two
    calls.clear()
    cached = synthesise(*pair, init, task, cfg, tmp_path, progress=False)
    assert cached.texts == whole.texts and not calls
    # read back: the seconds saved with its last step, without the reload's
    assert resumed.summary["synth_s"] - 0.1 <= cached.summary["synth_s"] <= resumed.summary["synth_s"]


def test_gcg_step_keeps_several_swaps_on_distinct_documents(pair, task: Task) -> None:
    init, _ = select_init(pair, task)
    problem = make_problem(*pair, task)
    start = scored(problem, init.texts)
    active, rest = torch.arange(len(start.texts)), torch.zeros_like(problem.delta)
    ends = {}
    for per_step in (1, len(start.texts)):
        docs = start.clone()
        cfg = SynthConfig(method="GCG", topk=64, search_width=64, swaps_per_step=per_step)
        value = gcg_step(problem, docs, active, rest, cfg, step_generator(0, 0))
        assert value == pytest.approx(docs.objective(problem.delta), abs=1e-6)  # exact, no estimate
        assert value > start.objective(problem.delta) and 1 <= int(docs.changed.sum()) <= per_step
        ends[per_step] = value, int(docs.changed.sum())
    # the same swaps: the single best is the first one kept, and every further one adds
    assert ends[len(start.texts)][0] > ends[1][0] and ends[len(start.texts)][1] > 1


@pytest.mark.parametrize("keep", ["set", "documents"])
def test_admm_keeps_a_good_rewrite_beside_a_bad_one_only_by_documents(
    pair, task: Task, keep: str, monkeypatch
) -> None:
    init, _ = select_init(pair, task)
    problem = make_problem(*pair, task)
    start = scored(problem, init.texts)

    def rewritten(docs, row: int, scale: float):
        out = docs.clone()  # document `row` rewritten: other tokens, its gradient scaled
        out.ids[row], out.errors[row] = out.ids[row].roll(1), scale * out.errors[row]
        out.texts[row], out.changed[row] = f"rewrite of {row}", True
        return out

    # a small rescaling of document 0's gradient raises the objective one way or the other
    improved = max(
        (rewritten(start, 0, scale) for scale in (0.5, 1.5)), key=lambda d: d.objective(problem.delta)
    )
    projected = rewritten(improved, 1, -10.0)  # one projection: that good rewrite, and a bad one
    assert (
        improved.objective(problem.delta)
        > start.objective(problem.delta)
        > projected.objective(problem.delta)
    )
    monkeypatch.setattr(synthesis, "rebuilt", lambda *_: projected.clone())
    cfg = SynthConfig(method="ADMM", steps=1, inner_steps=1, admm_keep=keep)
    out = synthesise(*pair, init, task, cfg, None, progress=False)
    if keep == "set":  # the whole projected set is worse: nothing changes
        assert out.texts == init.texts and out.summary["synthesised"] == 0
    else:  # the good rewrite is kept, the bad one is not
        assert out.texts == ["rewrite of 0", *init.texts[1:]] and out.summary["synthesised"] == 1
        assert out.sources[0] == SYNTHESISED
        assert out.summary["objective_cos"] == pytest.approx(improved.objective(problem.delta), abs=1e-6)


def test_gcga_keeps_its_start_when_growth_ends_lower(pair, task: Task, monkeypatch) -> None:
    init, _ = select_init(pair, task)

    def spoil(problem, docs, active, rest, cfg, generator) -> float:  # every grown gradient reversed
        docs.errors[active] = -docs.errors[active]
        docs.changed[active] = True
        return 0.0

    monkeypatch.setattr(synthesis, "gcg_step", spoil)
    out = synthesise(*pair, init, task, SynthConfig(method="GCGA", doc_steps=1), None, progress=False)
    assert out.texts == init.texts and out.summary["synthesised"] == 0
    assert out.summary["objective_cos"] == pytest.approx(init.summary["objective_cos"], abs=1e-5)


def test_random_init_and_bad_input(pair, task: Task) -> None:
    with pytest.raises(W2DError, match="opt"):
        SynthConfig(method="MAGIC")
    with pytest.raises(W2DError, match="rho"):
        SynthConfig(rho=0.0)
    from weights2data.synthesis import check_synthesis

    with pytest.raises(W2DError, match="--grad-blocks"):
        check_synthesis(SynthConfig(method="GCG"), SelectConfig(grad_blocks=2), task)
    with pytest.raises(W2DError, match="classification"):
        check_synthesis(SynthConfig(method="GCG"), SelectConfig(), replace(task, kind="lm", label_set=None))


RUN = [
    "run", "--model", "tiny-test", "--dataset", "ag_news_32", "--corpus", "wiki_passages_24", "-k", "6",
    "--eval-epochs", "1", "--max-eval-rows", "16", "--skip-similarity", "--train-scope", "head",
    "--lr", "1e-2", "--seq-len", "10", "--steps", "1", "--synth-steps", "2", "--synth-topk", "8",
    "--search_width", "8", "--strategies", "greedy", "--results-dir", "runs",
]  # fmt: skip


def test_run_with_gcg_end_to_end(cli_env) -> None:
    assert main([*RUN, "--opt", "GCG", "--exp-name", "gcg"]) == 0
    results = json.loads((cli_env / "runs" / "gcg" / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == ["expert", "greedy", "gcg", "random"]
    summary = results["selections"]["gcg"]
    assert summary["objective_cos"] >= results["selections"]["greedy"]["objective_cos"] - 1e-5
    assert summary["precondition"] == results["selections"]["greedy"]["precondition"] == "adam"
    table = pq.read_table(cli_env / "runs" / "gcg" / "selection-gcg" / "selection.parquet").to_pydict()
    assert len(table["text"]) == 6 and set(table["source"]) <= {"corpus", SYNTHESISED}
    assert table["source"].count(SYNTHESISED) == summary["synthesised"]


def test_select_with_admm_and_bad_opt(cli_env, capsys) -> None:
    args = ["select", "--base", "tiny-test", "--finetuned", "tiny-test:1", "--label-set", "A,B",
            "--corpus", "wiki_passages_12", "-k", "4", "--seq-len", "8", "--opt", "ADMM",
            "--synth-steps", "2", "--max_iterations_x", "2", "--exp-name", "admm"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((cli_env / "runs" / "admm" / "summary.json").read_text())
    assert summary["strategy"] == "ADMM" and summary["objective_cos"] >= summary["objective_init"] - 1e-6
    assert "objective" in capsys.readouterr().out
    assert main([*RUN, "--opt", "NOPE", "--exp-name", "bad"]) == 2
    assert "unknown opt 'NOPE'" in capsys.readouterr().err


def test_synthesis_help(capsys) -> None:
    for command in ("select", "run"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for flag in ("--opt", "--synth-steps", "--synth-init", "--search_width", "--admm_penalty_term",
                     "--lr_tokens", "--max_iterations_x", "--gcg_documents_to_swap"):  # fmt: skip
            assert flag in out, (command, flag)
