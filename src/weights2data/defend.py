"""Defences: change a finetuned model θ1 before its release so that its weights say less about its data.

`defend` returns a defended copy θ1′ and a record of what it did; `defend_cached` saves θ1′ as a
Hugging Face directory whose w2d.json keeps θ1's metadata (task, label set, training settings) and
adds a `defense` record, so every other command reads it as any finetune. Each method is seeded and
deterministic: the same inputs, versions and device give the same weights. Below Δ = θ1 − θ0.

- noise: θ1′ = θ1 + S·ε, ε ~ N(0, 1), on every weight (the original's `run_gaussian_defense`,
  which it never called).
- relative-noise: noise scaled to the update. In each tensor, on the rows the finetune changed (slices
  along the first dimension; a vector is one row), σ = S · rms(Δ over those rows); everything else
  stays exact, so the frozen lower blocks (and their cached states) are untouched. Rows rather than
  whole tensors because a classifier's finetune changes only the C label rows of a V-row head: a
  per-tensor rms would shrink the noise on them by √(C/V).
- retrain: continue training θ1 on public text, minimising next-token loss + λ · KL(p_θ1 ‖ p_θ)
  for S × 100 steps (or `steps`) with the expert's optimiser, learning rate and batch size, training
  only what the finetune changed (its scope; for a classifier, of the head only its label rows).
  p is the task's output distribution: a classifier's label tokens at the last position; for
  language modelling the next token at every position. The next-token loss moves the weights, the
  KL keeps the outputs.
- head-obfuscate: W′ = W + D with D minimising KL(softmax(hW) ‖ softmax(hW′)) − S · ‖D‖ / ‖W‖, the
  mean over public-text hidden states h (a classifier: its label rows, at the last position), by
  `steps` Adam steps of 1% of rms(W) from a seeded start near W, keeping the best iterate: the mean
  KL on that text is then at most S times the relative move (plus the start's, ~0). Moves the softmax
  cannot see (one vector added to every row) and directions the h do not span cost no KL, so along
  them the step budget, not S, bounds the move. (The original's version of this never wrote W′ back.)
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weights2data.config import DefenseConfig, EvalConfig, to_dict
from weights2data.data import Encoded, Split
from weights2data.errors import W2DError
from weights2data.features import cache_key, hidden_states
from weights2data.models import META_FILE, LoadedModel, check_finite, save_model, untie_head
from weights2data.pipeline import Workspace
from weights2data.recover import hidden_at
from weights2data.store import read_json, stable_hash, touch
from weights2data.train import ScopedModel, Task, check_trained, evaluate, make_optimizer
from weights2data.trajectory import changed_scope, expert_settings, paired_weights

log = logging.getLogger(__name__)

NEEDS_BASE = ("relative-noise", "retrain")
NEEDS_CORPUS = ("retrain", "head-obfuscate")
OBFUSCATE_LR = 0.01  # head-obfuscate's Adam step, in units of rms(W)
OBFUSCATE_POSITIONS = 1024  # language modelling: public-text positions per head-obfuscate step


def defend(
    finetuned: LoadedModel,
    cfg: DefenseConfig,
    base: LoadedModel | None = None,
    corpus: Split | None = None,
    task: Task | None = None,
    cache_root: Path | None = None,
) -> tuple[LoadedModel, dict]:
    """A defended copy of `finetuned` and what the defence did (see the module docstring).

    `base` is needed by relative-noise and retrain, `corpus` (public text) and `task` by retrain and
    head-obfuscate; `finetuned` itself is left as it was.
    """
    check_inputs(cfg, base, corpus)
    task = task or saved_task(finetuned)
    defended = LoadedModel(
        copy.deepcopy(finetuned.model),
        finetuned.tokenizer,
        f"{finetuned.spec}+{cfg.method}",
        meta=finetuned.meta,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.method == "noise":
        stats = add_noise(defended.model, cfg.strength, generator)
    elif cfg.method == "relative-noise":
        stats = add_relative_noise(defended.model, base, cfg.strength, generator)
    elif cfg.method == "retrain":
        stats = retrain(defended, finetuned, base, corpus.texts, task, cfg, generator, cache_root)
    else:
        stats = obfuscate_head(defended, finetuned, base, corpus.texts, task, cfg, generator, cache_root)
    check_finite(defended.model, "the defended model")
    stats["moved"] = distance(finetuned, defended.model)  # ‖θ1′ − θ1‖ over every weight
    if base is not None:
        stats["update"] = distance(base, finetuned.model)  # ‖θ1 − θ0‖, the finetune's own change
    return defended, stats


def check_inputs(cfg: DefenseConfig, base: LoadedModel | None, corpus: Split | None) -> None:
    if cfg.method == "none":
        raise W2DError("no defence chosen: pass --method noise, relative-noise, retrain or head-obfuscate")
    if cfg.method in NEEDS_BASE and base is None:
        raise W2DError(f"{cfg.method} compares the finetuned model with its base: pass --base")
    if cfg.method in NEEDS_CORPUS and (corpus is None or len(corpus) == 0):
        raise W2DError(f"{cfg.method} needs public text: pass --corpus (e.g. wiki_passages_2000)")


def saved_task(finetuned: LoadedModel, seq_len: int = 32) -> Task:
    """The task the finetuned model's w2d.json records; without one, language modelling at `seq_len`."""
    saved = finetuned.meta.get("task")
    return Task.from_dict(saved) if saved else Task("lm", seq_len)


def distance(reference: LoadedModel, model: torch.nn.Module) -> float:
    """The Frobenius norm of `model` − `reference` over every weight of `model`."""
    with torch.no_grad():
        total = sum(float((p - start).square().sum()) for _, p, start in paired_weights(reference, model))
    return math.sqrt(total)


def gaussian(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Seeded N(0, 1) drawn on the CPU, so every device gets the same numbers, then moved to `like`'s."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


# ---------------------------------------------------------------- noise


@torch.no_grad()
def add_noise(model: torch.nn.Module, strength: float, generator: torch.Generator) -> dict:
    """θ + S·N(0, 1) on every weight, in place (a tied embedding and head get one draw)."""
    for param in model.parameters():
        param.add_(gaussian(tuple(param.shape), generator, param), alpha=strength)
    return {}


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A (rows, -1) view: slices along the first dimension; a vector is one row."""
    return tensor.view(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.view(1, -1)


@torch.no_grad()
def add_relative_noise(
    model: torch.nn.Module, base: LoadedModel, strength: float, generator: torch.Generator
) -> dict:
    """Noise of σ = S · rms(Δ) on the rows of each tensor the finetune changed, in place."""
    noised = 0
    for _, param, start in paired_weights(base, model):
        rows = as_rows(param)
        delta = rows - as_rows(start)
        changed = delta.ne(0).any(1)
        if not changed.any():
            continue
        sigma = strength * delta[changed].square().mean().sqrt()
        rows[changed] += sigma * gaussian((int(changed.sum()), rows.shape[1]), generator, rows)
        noised += 1
    return {"noised_tensors": noised}


# ---------------------------------------------------------------- retrain


def retrain(
    defended: LoadedModel,
    finetuned: LoadedModel,
    base: LoadedModel,
    texts: list[str],
    task: Task,
    cfg: DefenseConfig,
    generator: torch.Generator,
    cache_root: Path | None,
) -> dict:
    """Train `defended` in place on public text: next-token loss + λ · KL(finetuned ‖ defended)."""
    settings = replace(expert_settings(base, finetuned, cfg.optimiser_steps), seed=cfg.seed)
    scope = changed_scope(base, finetuned)
    student = ScopedModel(defended, scope, task)
    teacher = ScopedModel(finetuned, scope, task, training=False)
    encoded = task.encode(defended, texts)
    frozen = lower_states(student, encoded, cache_root)
    optimizer = make_optimizer(student.parameters(), settings)
    lm_losses, kls = [], []
    for _ in tqdm(range(settings.steps), desc="retrain", unit="step", leave=False):
        index = torch.randint(len(encoded), (settings.batch_size,), generator=generator)
        batch, part = encoded.subset(index), None if frozen is None else frozen[index]
        with torch.no_grad():
            target = F.log_softmax(teacher.logits(part, batch), -1)
        logits, log_p = outputs(student, part, batch)
        lm, kl = next_token_loss(logits, batch), task_kl(log_p, target, batch)
        optimizer.zero_grad(set_to_none=True)
        (lm + cfg.kl_weight * kl).backward()
        optimizer.step()
        lm_losses.append(lm.item())
        kls.append(kl.item())
    student.finalize()
    check_trained(student)
    tail = max(1, len(kls) // 10)  # the last tenth of the steps
    return {
        "scope": scope,
        "steps": settings.steps,
        "lr": settings.lr,
        "lm_loss_first": sum(lm_losses[:tail]) / tail,
        "lm_loss_last": sum(lm_losses[-tail:]) / tail,
        "kl_last": sum(kls[-tail:]) / tail,
    }


def lower_states(scoped: ScopedModel, encoded: Encoded, cache_root: Path | None) -> torch.Tensor | None:
    """(N, T, d) what the trained part reads at every position, computed once (None: full scope).

    The inputs of the first trained block (top:N) or the final states (head), shared with the
    recovery's caches of the same text.
    """
    if scoped.kind == "full":
        return None
    layer = scoped.first_trained_layer
    return hidden_states(scoped.loaded, encoded, layer=layer, cache_root=cache_root, desc="public text")


def outputs(
    scoped: ScopedModel, frozen: torch.Tensor | None, batch: Encoded
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (B, T, V) and the task's log-probabilities: (B, C) over the label tokens at
    the last position for a classifier, (B, T, V) for language modelling."""
    logits = vocab_logits(scoped, scoped.final_hidden(frozen, batch))
    if scoped.task.kind == "classification":
        ids = torch.tensor(scoped.task.label_set.token_ids, device=logits.device)
        return logits, F.log_softmax(logits[:, -1, ids], -1)
    return logits, F.log_softmax(logits, -1)


def vocab_logits(scoped: ScopedModel, hidden: torch.Tensor) -> torch.Tensor:
    """(…, V) logits over the whole vocabulary, with a classifier's trained label rows in place.

    The frozen rest of the head gets no gradient: only the label columns are recomputed.
    """
    logits = scoped.head(hidden)
    if scoped.label_rows is None:
        return logits
    ids = torch.tensor(scoped.task.label_set.token_ids, device=logits.device)
    bias = getattr(scoped.head, "bias", None)
    return logits.index_copy(
        -1, ids, F.linear(hidden, scoped.label_rows, None if bias is None else bias[ids])
    )


def next_pairs(batch: Encoded, device: torch.device) -> torch.Tensor:
    """(B, T − 1) bool: position t predicts token t + 1 and both are real tokens (any padding side)."""
    mask = batch.attention_mask.to(device).bool()
    return mask[:, :-1] & mask[:, 1:]


def next_token_loss(logits: torch.Tensor, batch: Encoded) -> torch.Tensor:
    valid = next_pairs(batch, logits.device)
    targets = batch.input_ids.to(logits.device)[:, 1:][valid]
    return F.cross_entropy(logits[:, :-1][valid], targets, reduction="sum") / max(int(valid.sum()), 1)


def task_kl(log_p: torch.Tensor, target: torch.Tensor, batch: Encoded) -> torch.Tensor:
    """Mean KL(target ‖ p) per example (a classifier) or per predicted position (language modelling)."""
    if log_p.dim() == 3:
        valid = next_pairs(batch, log_p.device)
        log_p, target = log_p[:, :-1][valid], target[:, :-1][valid]
    return F.kl_div(log_p, target, log_target=True, reduction="batchmean")


# ---------------------------------------------------------------- head obfuscation


def obfuscate_head(
    defended: LoadedModel,
    finetuned: LoadedModel,
    base: LoadedModel | None,
    texts: list[str],
    task: Task,
    cfg: DefenseConfig,
    generator: torch.Generator,
    cache_root: Path | None,
) -> dict:
    """Move the head (a classifier: its label rows) in place, as far as the KL penalty allows."""
    untie_head(defended.model)  # a tied head would move the input embeddings with it
    head = defended.model.get_output_embeddings().weight
    rows = (
        torch.tensor(task.label_set.token_ids, device=head.device)
        if task.kind == "classification"
        else torch.arange(head.shape[0], device=head.device)
    )
    hidden = public_states(finetuned, base, texts, task, cache_root)
    shift, stats = obfuscate(head[rows].detach(), hidden, cfg.strength, cfg.optimiser_steps, generator)
    with torch.no_grad():
        head[rows] += shift
    return {**stats, "steps": cfg.optimiser_steps}


def public_states(
    finetuned: LoadedModel, base: LoadedModel | None, texts: list[str], task: Task, cache_root: Path | None
) -> torch.Tensor:
    """(M, d) final hidden states the head reads on public text: a classifier's last positions, or
    every real position for language modelling."""
    encoded = task.encode(finetuned, texts)
    if task.kind == "classification":  # with the base, the frozen lower blocks' cache is shared
        return hidden_at(base or finetuned, finetuned, finetuned, encoded, cache_root)
    states = hidden_states(finetuned, encoded, cache_root=cache_root, desc="public text")
    return states[encoded.attention_mask.bool()]


def obfuscate(
    weight: torch.Tensor, hidden: torch.Tensor, strength: float, steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """The shift D of the best of `steps` Adam steps on KL(softmax(hW) ‖ softmax(h(W + D))) − S‖D‖/‖W‖.

    `weight` (R, d), `hidden` (M, d). The KL is the mean over all of `hidden`, or over a seeded sample
    of OBFUSCATE_POSITIONS rows per step when it holds more (language modelling).
    """
    scale = weight.norm()
    rms = float(scale) / math.sqrt(weight.numel())
    # a start off zero: ‖D‖ has no gradient at D = 0
    shift = torch.nn.Parameter(1e-3 * rms * gaussian(tuple(weight.shape), generator, weight))
    optimizer = torch.optim.Adam([shift], lr=OBFUSCATE_LR * rms)
    best = (math.inf, shift.detach().clone(), {})
    for _ in tqdm(range(steps), desc="obfuscate head", unit="step", leave=False):
        h = hidden
        if len(hidden) > OBFUSCATE_POSITIONS:
            h = hidden[torch.randint(len(hidden), (OBFUSCATE_POSITIONS,), generator=generator)]
        h = h.to(weight.device)
        target = F.log_softmax(h @ weight.T, -1)
        kl = F.kl_div(
            F.log_softmax(h @ (weight + shift).T, -1), target, log_target=True, reduction="batchmean"
        )
        moved = shift.norm() / scale
        objective = kl - strength * moved
        if objective.item() < best[0]:
            best = (objective.item(), shift.detach().clone(), {"kl": kl.item(), "head_moved": moved.item()})
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
    return best[1], best[2]


# ---------------------------------------------------------------- saved defended models


def defend_cached(
    cache_root: Path,
    finetuned: LoadedModel,
    cfg: DefenseConfig,
    base: LoadedModel | None = None,
    corpus: Split | None = None,
    task: Task | None = None,
) -> tuple[Path, dict]:
    """`defend`, saved under <cache>/defended/<key hash>, or an identical earlier result reused.

    The key holds what the method reads: the finetuned weights, the settings, and where used the
    base weights, the public text and the task (plus the versions and device kind).
    """
    check_inputs(cfg, base, corpus)
    task = task or saved_task(finetuned)
    uses_base = base is not None and cfg.method != "noise"
    uses_text = cfg.method in NEEDS_CORPUS
    key = cache_key(
        next(finetuned.model.parameters()).device,
        finetuned=finetuned.fingerprint,
        defense=to_dict(cfg),
        base=base.fingerprint if uses_base else None,
        corpus=corpus.fingerprint if uses_text else None,
        task=task.to_dict() if uses_text else None,
    )
    target = cache_root / "defended" / stable_hash(key)
    if (target / META_FILE).exists():
        log.info("reusing the defended model %s (same model, defence and inputs)", target)
        touch(target / META_FILE)
        return target, read_json(target / META_FILE)
    defended, stats = defend(
        finetuned, cfg, base if uses_base else None, corpus if uses_text else None, task, cache_root
    )
    record = {**to_dict(cfg), "finetuned": finetuned.spec, "base": base.spec if uses_base else None, **stats}
    meta = {**finetuned.meta, "defense": record, "cache_key": target.name, "key": key}
    save_model(defended, target, meta)
    return target, meta


def defended_expert(
    ws: Workspace,
    base: LoadedModel,
    expert: LoadedModel,
    corpus: Split,
    task: Task,
    cfg: DefenseConfig,
    test: Split,
    ev: EvalConfig,
) -> tuple[LoadedModel, dict]:
    """The expert as an attacker would receive it, and the defence's record with the utility of the
    defended model (its own test metric) beside the undefended expert's."""
    path, meta = defend_cached(ws.cache, expert, cfg, base, corpus, task)
    defended = ws.model(str(path))
    record = {
        **meta["defense"],
        "model": str(path),
        "utility": evaluate(defended, test, task, ev, ws.cache),
        "undefended": evaluate(expert, test, task, ev, ws.cache),
    }
    return defended, record
