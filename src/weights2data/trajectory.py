"""Pseudo-experts: points on a path from the base weights θ0 to the finetuned θ1 (DESIGN §6).

A finetune's update is the sum of its steps along a path, and gradients taken at θ1 alone
describe its end, where the expert already fits its data. A path of P segments
θ0 = φ_0, φ_1, …, φ_P = θ1 gives segment k the target Δ_k = φ_{k−1} − φ_k and gradients at
its start φ_{k−1} (where a step from there would be taken: `--grad-at base`), its end φ_k
(the original's choice: `finetuned`) or both. P = 1 is the original's single segment.

`linear` is the straight path φ_k = θ0 + (k/P)(θ1 − θ0): every Δ_k is Δ/P and the points
differ only in where the gradients are taken. `distill` walks from θ0 instead, training the
weights the finetune changed to match θ1's label distribution on corpus documents (KL) with a
pull λ‖θ − θ1‖² towards θ1 (the original's pseudo-experts, made to work), with the expert's
optimiser for as many steps as the expert took, and snapshots the walk P − 1 times.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weights2data.config import GRAD_AT, PATHS, FinetuneConfig
from weights2data.data import Split
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, decoder_layers, first_changed_layer
from weights2data.train import ScopedModel, Task, make_optimizer, prepare

log = logging.getLogger(__name__)


def segments(
    base: LoadedModel, finetuned: LoadedModel, count: int, path: str, walk: Walk | None = None
) -> Iterator[tuple]:
    """(φ_{k−1}, φ_k) for k = 1..count; φ_0 and φ_P are `base` and `finetuned` themselves.

    `linear` builds one interpolated model at a time, so at most two extra copies are alive;
    `distill` needs the corpus `walk` to train on.
    """
    if count < 1:
        raise W2DError(f"the number of pseudo-experts must be at least 1 (got {count})")
    if path not in PATHS:
        raise W2DError(f"unknown path '{path}': choose from {', '.join(PATHS)}")
    if path == "distill" and count > 1:
        if walk is None:
            raise W2DError("the distill path matches label distributions: it needs a classification finetune")
        middle: Iterable[LoadedModel] = distill(base, finetuned, walk, count - 1)
    else:
        middle = (interpolate(base, finetuned, k / count) for k in range(1, count))
    start = base
    for end in itertools.chain(middle, [finetuned]):
        yield start, end
        start = end


def gradient_points(start: LoadedModel, end: LoadedModel, grad_at: str) -> list[LoadedModel]:
    """Where a segment's gradients are taken: its end (finetuned), its start (base) or both."""
    if grad_at not in GRAD_AT:
        raise W2DError(f"unknown --grad-at '{grad_at}': choose from {', '.join(GRAD_AT)}")
    return {"finetuned": [end], "base": [start], "both": [start, end]}[grad_at]


def interpolate(base: LoadedModel, finetuned: LoadedModel, t: float) -> LoadedModel:
    """θ0 + t (θ1 − θ0) for every weight, on a copy of the finetuned model."""
    model = copy.deepcopy(finetuned.model)
    with torch.no_grad():
        for _, param, start in paired_weights(base, model):
            param.lerp_(start, 1.0 - t)  # param + (1 − t)(θ0 − param)
    return LoadedModel(model, finetuned.tokenizer, f"{finetuned.spec}@{t:.3f}", meta=finetuned.meta)


def paired_weights(
    base: LoadedModel, model: torch.nn.Module
) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, weight, the base model's value of it) for every weight of `model`, a finetune of `base`.

    Tied weights are listed under each of their names, so a head the finetune untied from the
    embeddings is matched with the base model's tied head, the embedding matrix it started from.
    """
    base_params = dict(base.model.named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters():
        start = base_params.get(name)
        if start is None or start.shape != param.shape:
            raise W2DError(f"weight {name}: the base model has no matching weight")
        yield name, param, start.detach().to(param.device, param.dtype)


@dataclass
class Walk:
    """What the distill walk trains on: the corpus and the finetuned model's label distribution."""

    texts: list[str]
    task: Task  # classification: the label set and sequence length
    target_probs: torch.Tensor  # (N, C) θ1's distribution over the label tokens
    settings: FinetuneConfig  # optimiser, learning rate, batch size, seed; steps = the walk's length
    pull: float = 1.0  # λ of λ‖θ − θ1‖², the original's weight
    cache_root: Path | None = None


def expert_settings(base: LoadedModel, finetuned: LoadedModel, steps: int = -1) -> FinetuneConfig:
    """How the expert trained, to train students and walks alike: the settings weights2data recorded
    with it (w2d.json), for `steps` steps or, with -1, as many as it took; for a model trained
    elsewhere, the defaults of the scope it changed for 100 steps."""
    saved, history = finetuned.meta.get("finetune"), finetuned.meta.get("history") or []
    if saved:
        settings = FinetuneConfig(**saved)
    else:
        kind = "lm" if (finetuned.meta.get("task") or {}).get("kind") == "lm" else "classification"
        settings = FinetuneConfig(train_scope=changed_scope(base, finetuned)).for_task(kind)
        log.info("the finetuned model records no training settings: students train %s", settings)
    taken = sum(epoch["steps"] for epoch in history) or 100
    return replace(settings, steps=steps if steps > 0 else taken)


def changed_scope(base: LoadedModel, finetuned: LoadedModel) -> str:
    """The train scope whose weights a finetune changed: head, top:N or full."""
    start, blocks = first_changed_layer(base.model, finetuned.model), len(decoder_layers(finetuned.model))
    return "head" if start == blocks else "full" if start == 0 else f"top:{blocks - start}"


def distill(base: LoadedModel, finetuned: LoadedModel, walk: Walk, snapshots: int) -> list[LoadedModel]:
    """`snapshots` points of a walk from θ0 that matches θ1's label distribution, pulled towards θ1."""
    if walk.task.kind != "classification":
        raise W2DError("the distill path matches label distributions: it needs a classification finetune")
    student = LoadedModel(copy.deepcopy(base.model), base.tokenizer, f"{base.spec}+walk", meta=finetuned.meta)
    scoped = ScopedModel(student, changed_scope(base, finetuned), walk.task)
    data = prepare(scoped, Split(walk.texts, walk.target_probs.argmax(-1).numpy()), walk.cache_root)
    params = scoped.parameters()
    targets = scoped.values_in(finetuned)
    optimizer = make_optimizer(params, walk.settings)
    generator = torch.Generator().manual_seed(walk.settings.seed)
    steps = walk.settings.steps or 100
    every = max(steps // (snapshots + 1), 1)
    points = []
    bar = tqdm(range(steps), desc="distill walk", unit="step", leave=False)
    for step in bar:
        index = torch.randint(len(data), (walk.settings.batch_size,), generator=generator)
        frozen, batch, _ = data.batch(index)
        log_p = F.log_softmax(scoped.logits(frozen, batch), -1)
        kl = F.kl_div(log_p, walk.target_probs[index].to(log_p.device), reduction="batchmean")
        pull = sum((p - t).square().sum() for p, t in zip(params, targets, strict=True))
        optimizer.zero_grad(set_to_none=True)
        (kl + walk.pull * pull).backward()
        optimizer.step()
        bar.set_postfix(kl=f"{kl.item():.4f}")
        if (step + 1) % every == 0 and len(points) < snapshots:
            scoped.finalize()
            points.append(
                LoadedModel(copy.deepcopy(student.model), base.tokenizer, f"{base.spec}+walk{step + 1}")
            )
    return points
