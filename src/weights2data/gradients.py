"""Per-example LM-head gradients of corpus documents, kept in factored form.

For one position with hidden state h and softmax error e = p − onehot(y), the loss
gradient w.r.t. the head W is e hᵀ. With logits restricted to the C label tokens, e is
zero outside the label rows, so a classification gradient is the C × d matrix e hᵀ:
inner products are exact from the factors (DESIGN §3) and nothing V × d is ever formed.

With the loss over the full vocabulary (`--label-loss full`), e is dense over all V rows and
the C × d form no longer holds; `full_vocab_features` keeps what it can exact (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weights2data.adapters import WeightDelta
from weights2data.data import LabelSet
from weights2data.errors import W2DError
from weights2data.models import LoadedModel
from weights2data.precondition import WHOLE, CorpusSlice, precondition
from weights2data.selection import DenseFeatures, FactoredFeatures, GradientFeatures, LowRankFeatures

COMBINE = ("concat", "sum")  # how gradients taken at several weights are joined
PROJECTIONS = ("rademacher", "normal")
FULL_EXACT_TOKENS = 256  # full-vocabulary loss: rows kept exact besides the label rows (the most probable)
FULL_SKETCH_DIM = 1024  # full-vocabulary loss: count-sketch buckets for every other row


def label_rows(loaded: LoadedModel, label_set: LabelSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight rows (C, d) and bias (C,) for the label tokens, on the CPU."""
    head = loaded.model.get_output_embeddings()
    ids = torch.tensor(label_set.token_ids, device=head.weight.device)
    bias = None if getattr(head, "bias", None) is None else head.bias[ids].detach().float().cpu()
    return head.weight[ids].detach().float().cpu(), bias


def label_probs(hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(N, C) softmax over the label tokens' logits."""
    return F.softmax(F.linear(hidden.float(), rows, bias), dim=-1)


@dataclass
class LabelledCorpus:
    """Labels assigned to corpus documents and their loss under the finetuned model."""

    labels: torch.Tensor  # (N,) long
    losses: torch.Tensor  # (N,) cross-entropy of the assigned label under the finetuned model
    probs: torch.Tensor  # (N, C) finetuned model's label distribution


def assign_labels(probs: torch.Tensor, rule: str, seed: int, corpus: CorpusSlice = WHOLE) -> LabelledCorpus:
    """`auto`: the finetuned model's prediction; `random`: uniform labels (a baseline), one seeded
    draw over the whole corpus of which `probs` (N, C) are a slice's rows."""
    if rule == "auto":
        labels = probs.argmax(-1)
    elif rule == "random":
        n = len(probs)
        drawn = torch.randint(
            probs.shape[1], (corpus.corpus_rows(n),), generator=torch.Generator().manual_seed(seed)
        )
        labels = drawn[corpus.offset : corpus.offset + n]
    else:
        raise W2DError(f"unknown label strategy '{rule}': use auto or random")
    return LabelledCorpus(labels, label_losses(probs, labels), probs)


def label_losses(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) the cross-entropy of each document's label `labels` (N,) under `probs` (N, C)."""
    return -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12))


@dataclass
class GradientPoint:
    """Head gradients taken at one set of weights, matched against one segment's weight change."""

    hidden: torch.Tensor  # (N, d) last hidden states at these weights
    rows: torch.Tensor  # (C, d) the head's label rows at these weights
    bias: torch.Tensor | None  # (C,)
    delta: torch.Tensor  # (C, d) the segment's target φ_{k−1} − φ_k on the label rows

    def errors(self, labels: torch.Tensor) -> torch.Tensor:
        return softmax_errors(self.hidden, self.rows, self.bias, labels)


def head_features(
    points: list[GradientPoint],
    labels: torch.Tensor,
    combine: str = "concat",
    total_delta: torch.Tensor | None = None,
    preconditioner: str = "none",
    corpus: CorpusSlice = WHOLE,
) -> list[GradientFeatures] | GradientFeatures:
    """Factored head gradients at every point, exact (DESIGN §3).

    `concat`: one feature part per point against its own segment's Δ_k (the caller joins them
    with `SummedFeatures`, i.e. the cosine of the concatenated gradients); `sum`: one gradient
    per document, the sum over the points, against `total_delta` = Σ_k Δ_k = W_base − W_finetuned.
    The preconditioner's moments are summed over every slice of `corpus` (torchrun's ranks).
    """
    if combine not in COMBINE:
        raise W2DError(f"unknown --path-combine '{combine}': choose from {', '.join(COMBINE)}")
    if combine == "concat":
        return [
            FactoredFeatures(*precondition(p.errors(labels), p.hidden, preconditioner, corpus), p.delta)
            for p in points
        ]
    errors = torch.stack([p.errors(labels) for p in points], 1)  # (N, P, C)
    hidden = torch.stack([p.hidden for p in points], 1)  # (N, P, d)
    errors, hidden = precondition(errors, hidden, preconditioner, corpus)
    if len(points) == 1:
        return FactoredFeatures(errors[:, 0], hidden[:, 0], total_delta)
    return LowRankFeatures(errors, hidden, total_delta)


def softmax_errors(
    hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """(N, C) e = p − onehot(y): the factor that multiplies hᵀ in the head gradient."""
    probs = label_probs(hidden, rows, bias)
    return probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)


def materialise(errors: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(N, C·d) flattened e_i h_iᵀ. Only for small C·d (JL parity)."""
    return torch.einsum("nc,nd->ncd", errors, hidden).reshape(errors.shape[0], -1)


def jl_project(
    features: FactoredFeatures, dim: int, kind: str = "rademacher", seed: int = 0, chunk: int = 4096
) -> DenseFeatures:
    """Random projection of the materialised gradients (the original's approximation).

    R has i.i.d. ±1/√D (rademacher) or N(0, 1/D) (normal) entries, so inner products are
    preserved in expectation. Exact selection (dim 0) needs none of this.
    """
    if kind not in PROJECTIONS:
        raise W2DError(f"unknown projection '{kind}': choose from {', '.join(PROJECTIONS)}")
    n, c = features.errors.shape
    d = features.hidden.shape[1]
    generator = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        proj = torch.randint(0, 2, (c * d, dim), generator=generator).float().mul_(2).sub_(1)
    else:
        proj = torch.randn(c * d, dim, generator=generator)
    proj /= math.sqrt(dim)
    grads = torch.cat(
        [
            materialise(features.errors[s : s + chunk], features.hidden[s : s + chunk]) @ proj
            for s in range(0, n, chunk)
        ]
    )
    return DenseFeatures(grads, features.delta.reshape(-1) @ proj)


def full_vocab_features(
    hidden: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None],
    delta: WeightDelta,
    label_ids: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    chunk: int = 512,
) -> FactoredFeatures:
    """Head gradients g_i = e_i h_iᵀ of the full-vocabulary loss at the label position, e_i ∈ R^V.

    `head` = (weight (V, d), bias) at the point the gradients are taken, `delta` the head's Δ (V × d,
    dense or a LoRA adapter's factors). What stays exact, and what is estimated:
    - ⟨g_i, Δ⟩ = (Δᵀ e_i)·h_i and ‖g_i‖² = ‖e_i‖² ‖h_i‖²: exact (one V-sized pass per document);
    - ⟨g_i, g_j⟩ = (e_i·e_j)(h_i·h_j): e_i is kept exactly on the label rows and on the
      FULL_EXACT_TOKENS rows with the largest mean probability over the corpus (where the error
      concentrates), and count-sketched elsewhere (each row hashed to one of FULL_SKETCH_DIM buckets
      with a random sign), so those terms are exact plus an unbiased estimate for the remaining rows.
    The result is a FactoredFeatures over (C + M + buckets) error coordinates with the exact terms set.
    """
    weight, bias = head
    device = weight.device
    n, vocab = hidden.shape[0], weight.shape[0]
    batches = [slice(s, s + chunk) for s in range(0, n, chunk)]

    def probs(rows: slice) -> torch.Tensor:
        return F.softmax(F.linear(hidden[rows].to(device).float(), weight, bias), dim=-1)

    mean = sum(probs(rows).sum(0) for rows in batches)
    mean[label_ids] = -1.0
    top = mean.topk(min(FULL_EXACT_TOKENS, vocab - len(label_ids))).indices
    exact = torch.cat([label_ids.to(device), top])
    bucket, sign = count_sketch(vocab, FULL_SKETCH_DIM, exact, seed)
    bucket, sign = bucket.to(device), sign.to(device)
    targets = label_ids.to(device)[labels.to(device)]
    errors, dots, sq_norms = [], torch.empty(n), torch.empty(n)
    for rows in batches:
        e, h = probs(rows), hidden[rows].to(device).float()
        e[torch.arange(len(h), device=device), targets[rows]] -= 1.0
        dots[rows] = (delta.left_times(e) * h).sum(1).cpu()
        sq_norms[rows] = (e.square().sum(1) * h.square().sum(1)).cpu()
        sketched = e.new_zeros(len(h), FULL_SKETCH_DIM).index_add_(1, bucket, e * sign)
        errors.append(torch.cat([e[:, exact], sketched], 1).cpu())
    rows_delta = torch.cat([delta.rows(exact), delta.bucket_sum(bucket, sign, FULL_SKETCH_DIM)])
    features = FactoredFeatures(torch.cat(errors), hidden, rows_delta.cpu())
    features.target_dots, features.sq_norms = dots, sq_norms
    features.delta_sq_norm = delta.sq_norm()
    return features


def count_sketch(rows: int, buckets: int, skip: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) bucket and (rows,) ±1 sign of each row (0 for the rows in `skip`): for x, y ∈ R^rows,
    x̃_b = Σ_{v: bucket_v = b} sign_v x_v gives E[x̃·ỹ] = Σ_{v ∉ skip} x_v y_v."""
    generator = torch.Generator().manual_seed(seed)
    bucket = torch.randint(buckets, (rows,), generator=generator)
    sign = torch.randint(0, 2, (rows,), generator=generator).float().mul_(2).sub_(1)
    sign[skip.cpu()] = 0.0
    return bucket, sign


def vocab_losses(
    hidden: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None],
    token_ids: torch.Tensor,
    chunk: int = 512,
) -> torch.Tensor:
    """(N,) cross-entropy over the full vocabulary of each document's label token `token_ids` (N,)."""
    weight, bias = head
    out = []
    for s in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[s : s + chunk].to(weight.device).float(), weight, bias)
        out.append(
            F.cross_entropy(logits, token_ids[s : s + chunk].to(weight.device), reduction="none").cpu()
        )
    return torch.cat(out)
