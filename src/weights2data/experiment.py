"""The whole research protocol in one call (`w2d run`).

Finetune the expert on a known dataset, recover a subset of the corpus from (base,
expert) weights, then train the base model on the true data, on each recovered subset
and on k random corpus documents labelled the same way, and score all of them on the
expert's test split. Gap closure = (recovered − random) / (expert − random).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from weights2data.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    RunConfig,
    SelectConfig,
    SynthConfig,
    to_dict,
)
from weights2data.data import Split
from weights2data.defend import DefenseConfig, defended_expert
from weights2data.errors import W2DError
from weights2data.generate import GenerateConfig, mark_sources, with_generated
from weights2data.models import LoadedModel
from weights2data.pipeline import Workspace, finetune_cached
from weights2data.recover import (
    Recovery,
    check_lm_selection,
    finetuned_predictions,
    generated_label_distribution,
    generation_labeller,
    recover,
    resolve_strategy,
    task_data,
    task_gradients,
    write_recovery,
)
from weights2data.rounds import recover_in_rounds
from weights2data.selection import LOSS_DROP
from weights2data.store import stable_hash, write_json
from weights2data.synthesis import check_synthesis, synthesise
from weights2data.train import Task, train_eval
from weights2data.trajectory import expert_settings

log = logging.getLogger(__name__)

RANDOM = "random"


def run_experiment(
    ws: Workspace,
    run_dir: Path,
    data: DataConfig,
    expert_ft: FinetuneConfig,
    ev: EvalConfig,
    sel: SelectConfig,
    run: RunConfig,
    gen: GenerateConfig | None = None,
    defense: DefenseConfig | None = None,
    synth: SynthConfig | None = None,
) -> dict:
    """Expert → selection(s) → expert / recovered / random scores; writes results.json.

    `gen`: documents generated from the expert against the base join the corpus as candidates
    (for the random baseline too: every strategy draws from the same pool).
    `defense`: recovery reads the expert as released behind this defence (its labels too); the
    defence's record, with the defended model's own test metric, goes into results["defense"].
    `synth`: --opt GCG | GCGA | ADMM writes documents from the first strategy's picks (or the random
    ones), trained and scored as one more row, named after the method.
    """
    if sel.label_set:
        raise W2DError(
            "w2d run labels with the expert's own label set (see --verbalizer); --label-set is for w2d select"
        )
    started = time.time()
    configs = strategy_configs(sel, run)  # checked before any work
    expert_data = ws.dataset(data.dataset, data, expert_ft.seed)
    if expert_data.test is None:
        raise W2DError(f"dataset '{expert_data.name}' has no test split to score the models on")
    corpus = ws.corpus(run.corpus, data, sel.k, sel.seed)
    expert_path, meta = finetune_cached(ws, run.base, expert_data, data, expert_ft)
    task = Task.from_dict(meta["task"])
    base = ws.model(run.base)
    expert = ws.finetuned(str(expert_path), base)
    if task.kind == "lm":
        for cfg in configs.values():
            check_lm_selection(cfg, [cfg.strategy])
        if ev.honest_by == "agreement":
            raise W2DError("--honest-by agreement needs a classification task; use --honest-by validation")
    if synth is not None and synth.synthesises:
        check_synthesis(synth, sel, task)
    defense_record = None
    if defense is not None and defense.method != "none":
        expert, defense_record = defended_expert(
            ws, base, expert, corpus, task, defense, expert_data.test, ev
        )
    labeller = (
        None
        if task.label_set is None
        else generation_labeller(base, expert, task.label_set, task_data(data, task))
    )
    corpus, sources = with_generated(corpus, base, expert, gen, task.seq_len, ws.cache, labeller)
    num_labels = None if task.label_set is None else len(task.label_set.names)
    configs = {name: resolve_strategy(cfg, num_labels, task.label_loss) for name, cfg in configs.items()}
    configs.setdefault(RANDOM, replace(sel, strategy=RANDOM))  # the run's own settings
    keys = {name: settings_key(cfg) for name, cfg in configs.items()}
    by_settings = {}  # one featurisation per distinct set of select settings, the baseline's first
    drop = any(cfg.strategy in LOSS_DROP for cfg in configs.values())  # base losses for all: cheap, shared
    for name in (RANDOM, *configs):
        if keys[name] not in by_settings:
            by_settings[keys[name]] = task_gradients(
                base, expert, corpus.texts, task, data, configs[name], ws.cache, drop
            )
    grads_of = {name: by_settings[key] for name, key in keys.items()}
    grads = grads_of[RANDOM]  # the autolabels
    recoveries = {
        name: recover(grads_of[name], corpus.texts, task.label_set, cfg)
        if cfg.rounds == 1 or cfg.strategy == RANDOM
        else recover_in_rounds(
            base,
            expert,
            corpus.texts,
            task,
            data,
            cfg,
            expert_settings(base, expert, cfg.student_steps),
            cfg.strategy,
            ws.cache,
            grads_of[name],
        )
        for name, cfg in configs.items()
    }
    generated_labels = generated_label_distribution(grads, sources, task.label_set)
    recoveries = {name: mark_sources(r, sources, generated_labels) for name, r in recoveries.items()}
    if synth is not None and synth.synthesises:
        start = run.strategy_list[0] if synth.init == "select" else RANDOM
        made = synthesise(
            base, expert, recoveries[start], task, synth, ws.cache, metric=grads_of[start].metric
        )
        random_picks = recoveries.pop(RANDOM)  # the baseline stays the table's last row
        recoveries |= {synth.method.lower(): made, RANDOM: random_picks}
    del base, expert
    for name, recovery in recoveries.items():
        write_recovery(recovery, run_dir / f"selection-{name}")
    test_ft = selection_training(expert_ft, run.optimizer_test)
    training_sets = {"expert": expert_data.train} | {n: as_split(r) for n, r in recoveries.items()}
    reference = None
    if ev.honest_by == "agreement":
        reference = agreement_reference(corpus, grads.probs.argmax(dim=1), ev, sel.seed)
    scores = {}
    for name, split in training_sets.items():
        log.info("training the base model on %s (%d rows)", name, len(split))
        scores[name] = train_eval(
            ws.model(run.base), split, expert_data.test, task, test_ft, ev, ws.cache, reference
        )
    results = {
        "expert_dataset": expert_data.name,
        "corpus": run.corpus,
        "k": sel.k,
        "task": task.kind,
        "expert_model": str(expert_path),
        "metric": scores["expert"]["metric"],
        "scores": scores,
        "table": closure_table(scores, task),
        "selections": {n: r.summary for n, r in recoveries.items()},
        "config": {
            "data": to_dict(data),
            "finetune": to_dict(expert_ft),
            "eval": to_dict(ev),
            "select": to_dict(sel),
            "run": to_dict(run),
        },
    }
    if defense_record is not None:
        results["defense"] = defense_record
        results["config"]["defense"] = to_dict(defense)
    if not run.skip_similarity:
        results["similarity"] = similarity_block(recoveries, expert_data.train.texts)
    results["seconds"] = round(time.time() - started, 1)
    write_json(run_dir / "results.json", results)
    return results


def strategy_configs(sel: SelectConfig, run: RunConfig) -> dict[str, SelectConfig]:
    """Each of the run's strategies by name, with `sel` and the settings the name gives it."""
    return {
        name: replace(sel, strategy=strategy, **overrides)
        for name, (strategy, overrides) in run.strategy_specs.items()
    }


def settings_key(cfg: SelectConfig) -> str:
    """What a selection's gradients depend on: every select setting but the strategy."""
    return stable_hash(to_dict(cfg) | {"strategy": None})


def selection_training(expert_ft: FinetuneConfig, optimizer: str | None = None) -> FinetuneConfig:
    """How every compared model trains: the expert's settings, epoch by epoch (EvalConfig sets how many)."""
    return replace(expert_ft, optimizer=optimizer or expert_ft.optimizer, steps=None, epochs=1)


def agreement_reference(corpus: Split, predicted: torch.Tensor, ev: EvalConfig, seed: int) -> Split:
    """`ev.agreement_rows` corpus documents labelled with the finetuned model's most likely label
    (`predicted`, (N,)): what `--honest-by agreement` picks epochs on (train_eval drops those a
    training set holds). Honest: it reads only the weights and the corpus, never the expert's data
    or the test set."""
    rows = agreement_rows(len(corpus), ev, seed)
    return Split([corpus.texts[i] for i in rows], predicted.numpy()[rows])


def agreement_rows(corpus_size: int, ev: EvalConfig, seed: int) -> np.ndarray:
    """The corpus rows agreement is scored on: `ev.agreement_rows` drawn by `seed`, in order."""
    return np.sort(np.random.default_rng(seed).permutation(corpus_size)[: ev.agreement_rows])


def finetuned_reference(
    base: LoadedModel,
    finetuned: LoadedModel,
    corpus: Split,
    task: Task,
    data: DataConfig,
    ev: EvalConfig,
    seed: int,
    cache: Path | None,
) -> Split:
    """As agreement_reference for a finetune weights2data did not train (train-eval
    --agreement-corpus): the finetuned model labels only the drawn rows, in its task's template."""
    if task.kind != "classification":
        raise W2DError("--agreement-corpus needs a classification task: agreement compares labels")
    texts = [corpus.texts[i] for i in agreement_rows(len(corpus), ev, seed)]
    predicted = finetuned_predictions(base, finetuned, texts, task.label_set, task_data(data, task), cache)
    return Split(texts, predicted.numpy())


def as_split(recovery: Recovery) -> Split:
    labels = None if recovery.labels is None else recovery.labels.numpy()
    return Split(recovery.texts, labels)


def closure(recovered: float, random: float, expert: float, lower_is_better: bool = False) -> float:
    """(recovered − random) / (expert − random): 1 matches the expert, 0 is no better than random.

    The same formula holds for losses (all signs flip together). NaN where the expert does not
    beat random: there is no gap to close, and the ratio of two noise-sized differences would
    read as a large closure.
    """
    gap = expert - random
    if (-gap if lower_is_better else gap) <= 1e-12:
        return math.nan
    return (recovered - random) / gap


def closure_table(scores: dict, task: Task) -> list[dict]:
    """One row per training set with both figures and their gap closure."""
    lm = task.kind == "lm"  # the metric is the loss: lower is better
    rows = []
    for name, score in scores.items():
        row = {"model": name}
        for figure in ("best_epoch_test", "val_selected_test"):
            row[figure] = score[figure]
            if name not in ("expert", RANDOM):
                row[f"closure_{figure}"] = closure(
                    score[figure], scores[RANDOM][figure], scores["expert"][figure], lower_is_better=lm
                )
        if lm:  # perplexity alongside the loss, and closure on perplexity
            for figure in ("best_epoch_test", "val_selected_test"):
                row[f"{figure}_perplexity"] = perplexity(score[figure])
                if name not in ("expert", RANDOM):
                    row[f"closure_perplexity_{figure}"] = closure(
                        perplexity(score[figure]),
                        perplexity(scores[RANDOM][figure]),
                        perplexity(scores["expert"][figure]),
                        lower_is_better=True,
                    )
        rows.append(row)
    return rows


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def similarity_block(recoveries: dict[str, Recovery], truth: list[str]) -> dict:
    """Dataset similarity of each selection to the true training texts."""
    from weights2data.metrics import SentenceEmbedder, dataset_similarity

    embedder = SentenceEmbedder()
    return {name: dataset_similarity(r.texts, truth, embedder=embedder) for name, r in recoveries.items()}


def format_closure(value: float | None, digits: int = 2) -> str:
    """A closure for a table: "n/a" where it is undefined (the expert did not beat random; NaN in
    memory, null in a results file)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """A plain-text table of expert / recovered / random scores and closure."""
    metric = results["metric"]
    lm = results.get("task") == "lm"
    width = max(16, *(len(row["model"]) + 2 for row in results["table"]))  # names carry their settings
    header = (
        f"{'model':<{width}}{'best-epoch ' + metric:>22}{'honest ' + metric:>20}{'closure (best/honest)':>26}"
    )
    if lm:
        header += f"{'best-epoch ppl':>16}{'honest ppl':>12}{'ppl closure':>16}"
    lines = [header]
    for row in results["table"]:
        closure_text = ""
        if "closure_best_epoch_test" in row:
            closure_text = " / ".join(
                format_closure(row[f"closure_{figure}"])
                for figure in ("best_epoch_test", "val_selected_test")
            )
        line = (
            f"{row['model']:<{width}}{row['best_epoch_test']:>22.4f}{row['val_selected_test']:>20.4f}"
            f"{closure_text:>26}"
        )
        if lm:
            ppl_closure = ""
            if "closure_perplexity_best_epoch_test" in row:
                ppl_closure = " / ".join(
                    format_closure(row[f"closure_perplexity_{figure}"])
                    for figure in ("best_epoch_test", "val_selected_test")
                )
            line += (
                f"{row['best_epoch_test_perplexity']:>16.4f}{row['val_selected_test_perplexity']:>12.4f}"
                f"{ppl_closure:>16}"
            )
        lines.append(line)
    return "\n".join(lines)
