"""What a finetune changed, and what it was trained for (`w2d inspect`).

For a base and a finetuned model (a directory, a merged checkpoint or a LoRA adapter):
- the relative change ‖W_finetuned − W_base‖ / ‖W_base‖ of each weight group (embeddings,
  every block, the final norm, the head) and the train scope it implies: head, top:N, full, lora;
- candidate label tokens, from two signals, each turned into a robust z-score over the
  vocabulary (how many median absolute deviations a token stands above the median token, 0
  below it) and summed: the change of each head row ‖ΔW_v‖ (a classifier's loss moves its label
  rows far more than the rest; Adam moves every row a full-vocabulary loss touches by about as
  much, which leaves no outliers and so no weight to this signal), and the shift of the
  next-token distribution at the label position (the end of the template) over corpus texts,
  Σ_docs p1_v · max(0, Δlog p_v − median_v' Δlog p_v') / N: how much more likely the finetune
  made token v than the typical token, weighted by its probability under the finetuned model
  (rare tokens moving between tiny probabilities count little);
- whether it looks like a classifier (TASK_RULE): the head's change beyond its median row
  concentrates in a few rows, the candidates hold most of the finetuned model's probability at
  the label position, or they stand far above every other token;
- a label set: the top candidates, one token per word, as many as come before the largest drop
  in score (LABEL_RULE).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from weights2data.data import LabelSet
from weights2data.features import hidden_states
from weights2data.lm_features import head_delta, head_view
from weights2data.models import LoadedModel, decoder_layers
from weights2data.templates import Template, encode
from weights2data.trajectory import changed_scope

CANDIDATES = 20  # candidate tokens listed, and the most a discovered label set holds
TOP_ROWS = 32  # a classifier's head change sits in at most this many rows (its label tokens)
CONCENTRATED = 0.5  # share of the head's excess change in the top rows that marks a classifier
SEPARATED = 2.0  # the last suggested label's score over the next candidate's that marks a classifier
LABEL_RULE = (
    "the top candidates before the largest ratio between consecutive scores, s_c / s_(c+1), "
    f"among the top {CANDIDATES} (at least 2; a token that is a higher one's word with other "
    "whitespace around it is a variant of it, not a label)"
)
TASK_RULE = (
    f"classification if the top {TOP_ROWS} head rows hold at least {CONCENTRATED:.0%} of the head's "
    "squared excess change, the suggested label tokens hold at least half of the finetuned model's "
    "next-token probability at the label position and at least twice the base's, or the last "
    f"suggested label scores at least {SEPARATED:g} times the next candidate; else lm"
)


def weight_groups(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The model's weights by group: embeddings, block i, final norm, head."""
    groups = {"embeddings": [model.get_input_embeddings().weight]}
    for i, layer in enumerate(decoder_layers(model)):
        groups[f"block {i}"] = list(layer.parameters())
    body = model.base_model
    norm = getattr(body, "norm", None) or getattr(body, "ln_f", None)
    if norm is not None:
        groups["final norm"] = list(norm.parameters())
    groups["head"] = [model.get_output_embeddings().weight]
    return groups


@torch.no_grad()
def weight_changes(base: LoadedModel, finetuned: LoadedModel) -> list[dict]:
    """Per group: ‖ΔW‖ / ‖W_base‖ over its weights, and its number of parameters."""
    base_groups, tuned_groups = weight_groups(base.model), weight_groups(finetuned.model)
    rows = []
    for name, tuned in tuned_groups.items():
        pairs = list(zip(base_groups[name], tuned, strict=True))
        change = sum(float((a.double() - b.to(a.device).double()).square().sum()) for a, b in pairs)
        size = sum(float(a.double().square().sum()) for a, _ in pairs)
        params = sum(a.numel() for a, _ in pairs)
        rows.append(
            {"group": name, "relative_change": math.sqrt(change / max(size, 1e-30)), "params": params}
        )
    return rows


def train_scope(base: LoadedModel, finetuned: LoadedModel, changes: list[dict]) -> str:
    """lora, head, top:N, full, or none (nothing changed)."""
    if finetuned.adapter is not None:
        return "lora"
    if all(row["relative_change"] == 0 for row in changes):
        return "none"
    return changed_scope(base, finetuned)


@torch.no_grad()
def next_token_shift(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    template: Template,
    seq_len: int,
    cache_root: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V,) the shift score of every token at the label position (module docstring), and the mean
    next-token probabilities there under the base and the finetuned model."""
    encoded = encode(template, finetuned.tokenizer, texts, seq_len, "classification")
    log_probs = []
    for model in (base, finetuned):
        hidden = hidden_states(model, encoded, last_only=True, cache_root=cache_root, desc="label position")
        view = head_view(model)
        logits = F.linear(hidden.to(view.weight.device), view.weight, view.bias)
        log_probs.append(F.log_softmax(logits.float(), -1).cpu())
    gain = log_probs[1] - log_probs[0]  # (N, V)
    typical = gain.median(dim=1, keepdim=True).values
    score = (log_probs[1].exp() * (gain - typical).clamp_min(0)).mean(0)
    return score, log_probs[0].exp().mean(0), log_probs[1].exp().mean(0)


def excess(row_changes: torch.Tensor) -> torch.Tensor:
    """How far each head row moved beyond the median row."""
    return (row_changes - row_changes.median()).clamp_min(0)


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """(x − median) / MAD, 0 below the median. A signal whose bulk did not move at all (a head of
    which only the label rows changed) has no spread: its outliers get a huge score."""
    center = x.median()
    spread = (x - center).abs().median()
    floor = 1e-9 * float(x.abs().max()) + 1e-30
    return ((x - center) / (spread + floor)).clamp_min(0)


def rank_candidates(
    head_rows: torch.Tensor, shift: torch.Tensor, p_base: torch.Tensor, p_tuned: torch.Tensor, tokenizer
) -> list[dict]:
    """The CANDIDATES tokens with the largest summed signal (special tokens left out)."""
    head, moved = robust_z(head_rows.double()), robust_z(shift.double())
    score = head + moved
    score[torch.tensor(tokenizer.all_special_ids, dtype=torch.long)] = -math.inf
    top = score.topk(CANDIDATES).indices.tolist()
    return [
        {
            "token_id": i,
            "token": tokenizer.decode([i]),
            "score": float(score[i]),
            "head_change": float(head[i]),
            "shift": float(moved[i]),
            "p_base": float(p_base[i]),
            "p_finetuned": float(p_tuned[i]),
        }
        for i in top
    ]


def distinct_words(candidates: list[dict]) -> list[dict]:
    """The candidates that are each the first of their word: a later token with the same text but
    for the whitespace around it ('positive' after ' positive') is marked a variant and left out,
    since no classifier tells such tokens apart as labels; a finetune that trained one of them
    moves both, and counting both would break the largest-drop rule."""
    first: dict[str, dict] = {}
    for candidate in candidates:
        word = candidate["token"].strip() or candidate["token"]
        if word in first:
            candidate["variant_of"] = first[word]["token"]
        else:
            first[word] = candidate
    return list(first.values())


def label_count(scores: list[float]) -> int:
    """LABEL_RULE: the c in 2..len−1 with the largest s_c / s_(c+1)."""
    floor = 1e-6 * max(scores[0], 1e-30)
    ratios = [scores[c - 1] / max(scores[c], floor) for c in range(2, len(scores))]
    return 2 + max(range(len(ratios)), key=ratios.__getitem__)


def inspect_finetune(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    template: Template,
    seq_len: int,
    cache_root: Path | None = None,
) -> dict:
    """The report of `w2d inspect` (module docstring)."""
    changes = weight_changes(base, finetuned)
    head_rows = head_delta(base, finetuned).row_norms().cpu()
    shift, p_base, p_tuned = next_token_shift(base, finetuned, texts, template, seq_len, cache_root)
    candidates = rank_candidates(head_rows, shift, p_base, p_tuned, finetuned.tokenizer)
    words = distinct_words(candidates)
    scores = [c["score"] for c in words]
    count = label_count(scores)
    labels = words[:count]
    squared = excess(head_rows).double().square()
    concentration = float(squared.topk(TOP_ROWS).values.sum() / squared.sum()) if squared.sum() > 0 else None
    mass = {"base": sum(c["p_base"] for c in labels), "finetuned": sum(c["p_finetuned"] for c in labels)}
    separation = scores[count - 1] / max(scores[count], 1e-12)
    classifier = (
        (concentration is not None and concentration >= CONCENTRATED)
        or (mass["finetuned"] >= 0.5 and mass["finetuned"] >= 2 * mass["base"])
        or separation >= SEPARATED
    )
    label_words = [label_word(c["token"], template) for c in labels]
    return {
        "base": base.spec,
        "finetuned": finetuned.spec,
        "adapter": None if finetuned.adapter is None else finetuned.adapter.describe(),
        "scope": train_scope(base, finetuned, changes),
        "changes": changes,
        "task": {
            "kind": "classification" if classifier else "lm",
            "head_concentration": concentration,
            "label_mass": mass,
            "separation": separation,
            "rule": TASK_RULE,
        },
        "template": template.describe(),
        "docs": len(texts),
        "candidates": candidates,
        "labels": labels,
        "label_count": count,
        "label_rule": LABEL_RULE,
        "label_set": ",".join(label_words) if all(label_words) else None,
    }


def label_word(token: str, template: Template) -> str | None:
    """The word whose --label-set entry becomes `token` after the template (None: none does)."""
    lead = template.label_lead
    word = token[len(lead) :] if token.startswith(lead) else None
    return word if word and word.strip() == word and "," not in word else None


def discover_label_set(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    template: Template,
    seq_len: int,
    cache_root: Path | None = None,
) -> LabelSet:
    """`--label-set discover`: the label tokens inspect suggests, named by their text."""
    report = inspect_finetune(base, finetuned, texts, template, seq_len, cache_root)
    tokens = [c["token"] for c in report["labels"]]
    return LabelSet([t.strip() or t for t in tokens], tokens, [c["token_id"] for c in report["labels"]])


def markdown(report: dict) -> str:
    """The report as markdown: scope, task, the changed weight groups, the candidates."""
    task = report["task"]
    concentration = task["head_concentration"]
    suggested = f"'{report['label_set']}'" if report["label_set"] else "discover"
    lines = [
        f"# {report['finetuned']} against {report['base']}",
        "",
        f"- train scope: **{report['scope']}**" + (f" ({report['adapter']})" if report["adapter"] else ""),
        f"- looks like: **{task['kind']}** (top {TOP_ROWS} head rows hold "
        + ("n/a, the head is unchanged" if concentration is None else f"{concentration:.0%}")
        + f" of the head's excess change; the suggested labels hold {task['label_mass']['finetuned']:.1%} of "
        f"the finetuned model's next-token probability at the label position, "
        f"{task['label_mass']['base']:.1%} of the base's, and score {task['separation']:.1f} times the next "
        "candidate)",
        f"- label position: the end of the template {report['template']}, over {report['docs']} corpus texts",
        f"- suggested: `--label-set {suggested}` ({report['label_count']} labels: {report['label_rule']})",
        "",
        "| weight group | relative change | parameters |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {row['group']} | {row['relative_change']:.2e} | {row['params']:,} |"
        for row in report["changes"]
        if row["relative_change"] > 0
    ] or ["| (none) | 0 | |"]
    lines += ["", "| token | score | head row excess change | distribution shift | p base | p finetuned |"]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {c['token']!r}"
        + (f" (variant of {c['variant_of']!r})" if "variant_of" in c else "")
        + f" | {c['score']:.3f} | {c['head_change']:.3f} | {c['shift']:.3f} | "
        f"{c['p_base']:.4f} | {c['p_finetuned']:.4f} |"
        for c in report["candidates"]
    ]
    return "\n".join(lines) + "\n"
