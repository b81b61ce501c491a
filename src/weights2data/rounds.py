"""Select → retrain rounds: re-take the gradients where a student trained on the picks so far stands.

Round 1 picks k/M documents against Δ = θ0 − θ1 as usual. Before each later round the base
model is trained on everything picked so far (the student θs, with the expert's optimiser,
learning rate, batch size and number of steps), the corpus gradients are taken at θs against
what is left to explain, Δs = θs − θ1, and the next k/M documents are picked among those not
picked yet. Labels stay the finetuned model's. Each round's picks are saved as it ends, so a
killed run resumes at the round it was in.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from weights2data.config import DataConfig, FinetuneConfig, SelectConfig, to_dict
from weights2data.data import Split
from weights2data.errors import W2DError
from weights2data.models import LoadedModel
from weights2data.recover import (
    CorpusGradients,
    Recovery,
    label_confidence,
    label_distribution,
    recover,
    task_gradients,
)
from weights2data.selection import objective
from weights2data.store import read_json, stable_hash, write_json
from weights2data.train import Task, finetune

log = logging.getLogger(__name__)


def round_sizes(k: int, rounds: int) -> list[int]:
    """k split into `rounds` near-equal blocks, the larger ones first: 10, 3 -> [4, 3, 3]."""
    if not 1 <= rounds <= k:
        raise W2DError(f"rounds must be between 1 and k = {k} (got {rounds})")
    return [k // rounds + (i < k % rounds) for i in range(rounds)]


def recover_in_rounds(
    base: LoadedModel,
    finetuned: LoadedModel,
    corpus_texts: list[str],
    task: Task,
    data: DataConfig,
    cfg: SelectConfig,
    student_ft: FinetuneConfig,
    strategy: str,
    cache_root: Path | None,
    first: CorpusGradients | None = None,
) -> Recovery:
    """`cfg.rounds` rounds of `strategy`; `first`: the round-1 gradients, when already computed."""
    started = time.time()
    first = first or task_gradients(base, finetuned, corpus_texts, task, data, cfg, cache_root)
    state = (
        None
        if cache_root is None
        else _state_dir(cache_root, base, finetuned, corpus_texts, cfg, student_ft, strategy)
    )
    picks: list[int] = []
    scores: list[torch.Tensor] = []
    rounds = []
    for r, size in enumerate(round_sizes(cfg.k, cfg.rounds)):
        saved = None if state is None else state / f"round_{r:03d}.json"
        if saved is not None and saved.exists():
            record = read_json(saved)
        else:
            grads = (
                first
                if r == 0
                else student_gradients(
                    base, finetuned, corpus_texts, picks, first, task, data, cfg, student_ft, cache_root
                )
            )
            chosen = recover(
                grads,
                corpus_texts,
                task.label_set,
                replace(cfg, k=size, rounds=1),
                strategy,
                exclude=torch.tensor(picks, dtype=torch.long),
            )
            record = {
                "rows": chosen.rows.tolist(),
                "scores": chosen.scores.tolist(),
                "objective_cos": chosen.summary["objective_cos"],
            }
            if saved is not None:
                write_json(saved, record)
        picks += record["rows"]
        scores.append(torch.tensor([np.nan if s is None else s for s in record["scores"]]))
        rounds.append({"round": r + 1, "k": size, "objective_cos": record["objective_cos"]})
        log.info(
            "round %d: %d documents picked (objective %.4f on this round's gradients)",
            r + 1,
            size,
            record["objective_cos"] or np.nan,
        )
    rows = torch.tensor(picks, dtype=torch.long)
    labels = None if first.labels is None else first.labels[rows]
    summary = {
        "strategy": strategy,
        "k": cfg.k,
        "corpus_size": len(corpus_texts),
        "objective_cos": objective(
            first.features, rows
        ),  # on the round-1 gradients, as a single round reports it
        "rounds": rounds,
        "select_s": round(time.time() - started, 2),  # students and their gradients included
        "student": to_dict(student_ft),
        "config": to_dict(cfg),
        **first.timings,
    }
    if labels is not None:
        summary["label_distribution"] = label_distribution(labels, task.label_set)
        summary["label_confidence"] = label_confidence(first, rows)
    return Recovery(
        rows, [corpus_texts[i] for i in picks], labels, task.label_set, torch.cat(scores), summary
    )


def student_gradients(
    base: LoadedModel,
    finetuned: LoadedModel,
    corpus_texts: list[str],
    picks: list[int],
    first: CorpusGradients,
    task: Task,
    data: DataConfig,
    cfg: SelectConfig,
    student_ft: FinetuneConfig,
    cache_root: Path | None,
) -> CorpusGradients:
    """Train the student on the picks so far, then take the corpus gradients at it against θs − θ1."""
    labels = None if first.labels is None else first.labels[picks].numpy()
    student = LoadedModel(copy.deepcopy(base.model), base.tokenizer, f"{base.spec}+student")
    finetune(student, Split([corpus_texts[i] for i in picks], labels), task, student_ft, cache_root)
    # the student is the start of a segment that ends at θ1: gradients at its start (`base`)
    at_student = replace(cfg, grad_at="base", pseudo_experts=1, path_combine="sum")
    return task_gradients(student, finetuned, corpus_texts, task, data, at_student, cache_root)


def _state_dir(
    root: Path,
    base: LoadedModel,
    finetuned: LoadedModel,
    corpus_texts: list[str],
    cfg: SelectConfig,
    student_ft: FinetuneConfig,
    strategy: str,
) -> Path:
    key = {
        "base": base.fingerprint,
        "finetuned": finetuned.fingerprint,
        "corpus": stable_hash(corpus_texts),
        "select": to_dict(cfg),
        "student": to_dict(student_ft),
        "strategy": strategy,
    }
    return Path(root) / "rounds" / stable_hash(key, 20)
