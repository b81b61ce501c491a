"""Pseudo-experts: points on a path from the base weights θ0 to the finetuned θ1 (DESIGN §6).

A finetune's update is the sum of its steps along a path, and gradients taken at θ1 alone
describe its end, where the expert already fits its data. A path of P segments
θ0 = φ_0, φ_1, …, φ_P = θ1 gives segment k the target Δ_k = φ_{k−1} − φ_k and gradients at
its start φ_{k−1} (where a step from there would be taken: `--grad-at base`), its end φ_k
(the original's choice: `finetuned`) or both. P = 1 is the original's single segment.

`linear` is the straight path φ_k = θ0 + (k/P)(θ1 − θ0): every Δ_k is Δ/P and the points
differ only in where the gradients are taken.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from weights2data.config import GRAD_AT, PATHS
from weights2data.errors import W2DError
from weights2data.models import LoadedModel


def segments(base: LoadedModel, finetuned: LoadedModel, count: int, path: str) -> Iterator[tuple]:
    """(φ_{k−1}, φ_k) for k = 1..count; φ_0 and φ_P are `base` and `finetuned` themselves.

    One interpolated model is built at a time, so at most two extra copies are alive.
    """
    if count < 1:
        raise W2DError(f"the number of pseudo-experts must be at least 1 (got {count})")
    if path not in PATHS:
        raise W2DError(f"unknown path '{path}': choose from {', '.join(PATHS)}")
    start = base
    for k in range(1, count + 1):
        end = finetuned if k == count else interpolate(base, finetuned, k / count)
        yield start, end
        start = end


def gradient_points(start: LoadedModel, end: LoadedModel, grad_at: str) -> list[LoadedModel]:
    """Where a segment's gradients are taken: its end (finetuned), its start (base) or both."""
    if grad_at not in GRAD_AT:
        raise W2DError(f"unknown --grad-at '{grad_at}': choose from {', '.join(GRAD_AT)}")
    return {"finetuned": [end], "base": [start], "both": [start, end]}[grad_at]


def interpolate(base: LoadedModel, finetuned: LoadedModel, t: float) -> LoadedModel:
    """θ0 + t (θ1 − θ0) for every weight, on a copy of the finetuned model.

    A head the finetune untied from the embeddings is matched with the base model's (tied)
    embedding matrix, which is what that head started from.
    """
    model = copy.deepcopy(finetuned.model)
    base_params = dict(base.model.named_parameters())
    base_head = base.model.get_output_embeddings().weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            start = base_params.get(name, base_head if name.startswith("lm_head") else None)
            if start is None or start.shape != param.shape:
                raise W2DError(f"cannot interpolate weight {name}: the base model has no matching weight")
            param.lerp_(start.to(param.device, param.dtype), 1.0 - t)  # param + (1 − t)(θ0 − param)
    return LoadedModel(model, finetuned.tokenizer, f"{finetuned.spec}@{t:.3f}", meta=finetuned.meta)
