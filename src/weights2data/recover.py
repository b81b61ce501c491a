"""From two checkpoints and a corpus to a labelled subset: the SELECT method end to end."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from weights2data.block_gradients import BatchLoss, block_features
from weights2data.config import DataConfig, SelectConfig, to_dict
from weights2data.data import Dataset, Encoded, LabelSet, make_label_set
from weights2data.errors import W2DError
from weights2data.features import final_hidden_from, hidden_states
from weights2data.generate import GENERATED, Labeller
from weights2data.gradients import (
    GradientPoint,
    assign_labels,
    full_vocab_features,
    head_features,
    jl_project,
    label_losses,
    label_probs,
    label_rows,
    vocab_losses,
)
from weights2data.lm_features import head_delta, head_view
from weights2data.models import LoadedModel, decoder_layers, first_changed_layer
from weights2data.precondition import WHOLE, CorpusSlice, Metric, fit_metric, resolve
from weights2data.selection import (
    AUTO,
    BALANCED,
    LOSS_DROP,
    WITHOUT_GRADIENTS,
    GradientFeatures,
    Selection,
    SummedFeatures,
    select,
    unit_weights,
)
from weights2data.store import atomic_path, stable_hash, write_json
from weights2data.templates import PLAIN, Template, encode, resolve_template
from weights2data.train import Task, label_loss_of, lm_loss_sum
from weights2data.trajectory import Walk, changed_scope, expert_settings, gradient_points, segments

log = logging.getLogger(__name__)

ONE_TOKEN_DROP = (
    "--loss-drop-per document sums a language-modelling document's token losses, and a "
    "classifier's loss drop has one label token: leave it at token"
)
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
    "n_embd",
    "n_layer",
    "n_head",
)


def check_pair(base: LoadedModel, finetuned: LoadedModel) -> None:
    """Base and finetuned must share architecture, weight shapes and tokenizer."""
    problems = []
    for key in SHAPE_KEYS:
        a, b = getattr(base.model.config, key, None), getattr(finetuned.model.config, key, None)
        if a != b:
            problems.append(f"config {key}: base {a} vs finetuned {b}")
    shapes_a = {n: tuple(p.shape) for n, p in base.model.named_parameters()}
    shapes_b = {n: tuple(p.shape) for n, p in finetuned.model.named_parameters()}
    head = {n for n in shapes_a.keys() ^ shapes_b.keys() if n.startswith("lm_head")}  # tied on one side only
    for name in sorted((shapes_a.keys() ^ shapes_b.keys()) - head)[:5]:
        problems.append(f"weight {name} exists in only one model")
    for name in sorted(shapes_a.keys() & shapes_b.keys()):
        if shapes_a[name] != shapes_b[name]:
            problems.append(f"weight {name}: base {shapes_a[name]} vs finetuned {shapes_b[name]}")
    if base.tokenizer.get_vocab() != finetuned.tokenizer.get_vocab():
        problems.append(f"tokenizers differ ({len(base.tokenizer)} vs {len(finetuned.tokenizer)} tokens)")
    family = [(m.model.config.model_type, m.model.config.vocab_size) for m in (base, finetuned)]
    if family[0] != family[1]:
        problems.insert(
            0,
            f"they are different model families (base: {family[0][0]}, {family[0][1]} tokens; finetuned: "
            f"{family[1][0]}, {family[1][1]} tokens), so --finetuned cannot be a finetune of --base",
        )
    if problems:
        raise W2DError("base and finetuned models do not match: " + "; ".join(problems[:8]))


def resolve_label_set(
    cfg: SelectConfig,
    data: DataConfig,
    finetuned: LoadedModel,
    label_dataset: Dataset | None,
    template: Template = PLAIN,
) -> LabelSet:
    """From --label-set (a dataset or a token list, its words following `template`), else the
    finetuned model's metadata; a label set given for a model that saved its own must have the
    same tokens."""
    saved = (finetuned.meta.get("task") or {}).get("label_set")
    if label_dataset is not None:
        if not label_dataset.has_labels:
            raise W2DError(f"--label-set {cfg.label_set}: that dataset has no labels")
        given = make_label_set(label_dataset.label_names, finetuned.tokenizer, data.verbalizer, template)
    elif cfg.label_set:
        words = [w.strip() for w in cfg.label_set.split(",")]
        given = make_label_set(words, finetuned.tokenizer, cfg.label_set, template)
    elif saved:
        return LabelSet.from_dict(saved)
    else:
        raise W2DError(
            "classification selection needs a label set: pass --label-set DATASET (e.g. ag_news) or "
            "--label-set 'A,B,C,D', or use a finetuned model saved by weights2data"
        )
    if saved and given.token_ids != LabelSet.from_dict(saved).token_ids:
        raise W2DError(
            f"--label-set {cfg.label_set} gives the label tokens {given.tokens}, but the finetuned model "
            f"was trained on {saved['tokens']} ({', '.join(saved['names'])}): leave --label-set unset"
        )
    return given


@dataclass
class Recovery:
    """The selected documents with their labels, and what the selection cost."""

    rows: torch.Tensor  # (k,) corpus row ids, in pick order
    texts: list[str]
    labels: torch.Tensor | None  # (k,)
    label_set: LabelSet | None
    scores: torch.Tensor
    summary: dict = field(default_factory=dict)
    sources: list[str] | None = None  # per pick: corpus or generated (generate.mark_sources); None: corpus

    def label_names(self) -> list[str]:
        return [self.label_set.names[i] for i in self.labels.tolist()]


def hidden_at(
    base: LoadedModel, finetuned: LoadedModel, at: LoadedModel, encoded: Encoded, cache_root: Path | None
) -> torch.Tensor:
    """(N, d) last hidden states of `at`: the finetuned model, the base, or a point between them.

    When the finetune left the lower blocks as they were (head or top:N), the inputs of the
    first changed block are shared with the base model's cache and only the changed blocks run.
    """
    start = first_changed_layer(base.model, finetuned.model)
    blocks = len(decoder_layers(finetuned.model))
    if start in (0, blocks) or not hasattr(at.model.base_model, "rotary_emb"):
        return hidden_states(at, encoded, last_only=True, cache_root=cache_root, desc="last hidden states")
    lower = hidden_states(at, encoded, layer=start, cache_root=cache_root, desc=f"inputs of block {start}")
    return final_hidden_from(at, lower, encoded, start, desc=f"blocks {start}+")


@dataclass
class CorpusGradients:
    """Everything about the corpus a strategy needs, computed once and shared by strategies."""

    features: object  # GradientFeatures
    labels: torch.Tensor | None
    losses: torch.Tensor
    timings: dict
    kind: str = "classification"  # or "lm": no labels, losses are mean next-token losses
    probs: torch.Tensor | None = None  # (N, C) the finetuned model's label distribution
    adapter: str | None = None  # the LoRA adapter the finetuned model is, described
    metric: Metric | None = None  # the head preconditioner, when one gradient point was preconditioned
    base_losses: torch.Tensor | None = None  # (N,) the autolabels' (or LM) losses under the base
    tokens: torch.Tensor | None = None  # (N,) LM: each document's scored positions

    def to(self, device: torch.device) -> CorpusGradients:
        """The features on `device`, where the greedy engine then runs; labels and losses stay."""
        return self if device.type == "cpu" else replace(self, features=self.features.to(device))


def lm_corpus_gradients(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    seq_len: int,
    lm_loss: str,
    cfg: SelectConfig,
    cache_root: Path | None,
    template: Template = PLAIN,
    base_losses: bool = False,
) -> CorpusGradients:
    """Language modelling: sketched head gradients with exact ⟨g, Δ⟩ and ‖g‖² (lm_features).

    --projection-dim 0 (the classification default: exact) means the default 4096-dimensional
    Kronecker sketch here; LM gradients are V × d and cannot be held exactly. The documents'
    mean next-token losses under the base model too when `base_losses` is set or the strategy
    is the loss drop (one more head pass over the corpus, cached).
    """
    from weights2data.lm_features import DEFAULT_DIM, lm_features, lm_losses

    if cfg.path_combine == "sum" and cfg.pseudo_experts > 1:
        raise W2DError("language-modelling gradients of several pseudo-experts join by --path-combine concat")
    encoded = encode(template, finetuned.tokenizer, texts, seq_len, "lm")
    # `both` summed within a segment is lm_features' own; concatenated, it is one part per end
    views = ["base", "finetuned"] if cfg.grad_at == "both" and cfg.path_combine == "concat" else [cfg.grad_at]
    heads, blocks, losses, tokens, timings = [], [], None, None, {"lm_loss": lm_loss}
    for start, end in segments(base, finetuned, cfg.pseudo_experts, cfg.path):
        for view in views:
            out = lm_features(
                start,
                end,
                encoded,
                lm_loss=lm_loss,
                grad_at=view,
                dim=cfg.projection_dim or DEFAULT_DIM,
                projection=cfg.projection,
                seed=cfg.seed,
                cache_root=cache_root,
            )
            heads.append(out.features)
            timings = merge_timings(timings, out.timings)
            if end is finetuned:
                losses, tokens = out.losses, out.tokens  # under the finetuned model
            if cfg.grad_blocks:
                at = end if view == "finetuned" else start
                head = at.model.get_output_embeddings()

                def batch_loss(final: torch.Tensor, batch: Encoded, _index: slice, head=head) -> torch.Tensor:
                    return lm_loss_sum(head(final), batch, lm_loss)[0]

                block, block_timings = block_part(
                    start, end, at, encoded, batch_loss, f"lm:{lm_loss}", cfg, cache_root
                )
                blocks += [block] if block is not None else []
                timings = merge_timings(timings, block_timings)
    at_base = None
    if base_losses or cfg.strategy in LOSS_DROP:
        at_base = lm_losses(base, encoded, lm_loss=lm_loss, cache_root=cache_root)
    parts, note = changed_parts(heads, blocks)
    return CorpusGradients(
        joined(parts),
        None,
        losses,
        timings | note | task_notes(template),
        kind="lm",
        adapter=adapter_of(finetuned),
        base_losses=at_base,
        tokens=tokens,
    )


def corpus_gradients(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    label_set: LabelSet,
    data: DataConfig,
    cfg: SelectConfig,
    cache_root: Path | None,
    base_losses: bool = False,
    corpus: CorpusSlice = WHOLE,
) -> CorpusGradients:
    """Hidden states of the corpus (cached), labels, losses and factored head gradients.

    Labels and losses come from the finetuned model; the autolabels' losses under the base model
    too when `base_losses` is set or the strategy is a loss drop (one more forward pass over the
    blocks the finetune changed, cached). Gradients are taken at the points of each
    path segment that --grad-at names (P = 1, finetuned: the original's), each against its
    segment's weight change, and joined by --path-combine. The template and the label loss are
    the flags', else the finetuned model's recorded ones (templates.resolve_template). With
    `corpus` a slice (one torchrun rank's `texts`), the preconditioners are the whole corpus's.
    """
    started = time.time()
    mode = data.label_loss or label_loss_of(finetuned.meta.get("task"))
    scope, asked = changed_scope(base, finetuned), cfg.strategy
    cfg = resolve_strategy(cfg, len(label_set.names), mode)
    if mode == "full":
        check_full_loss(cfg)
    if cfg.loss_drop_per == "document":
        raise W2DError(ONE_TOKEN_DROP)
    template, encoded, hidden = finetuned_hidden(base, finetuned, texts, data, cache_root)
    tuned_rows = label_rows(finetuned, label_set)
    memo = {id(finetuned): (finetuned, hidden)}
    probs = label_probs(memo[id(finetuned)][1], *tuned_rows)
    labelled = assign_labels(probs, cfg.labels, cfg.seed, corpus)  # the argmax is the same under either loss
    token_ids = torch.tensor(label_set.token_ids)
    if mode == "full":
        labelled.losses = autolabel_losses(finetuned, hidden, label_set, labelled.labels, mode)
    at_base = None
    if base_losses or cfg.strategy in LOSS_DROP:
        memo[id(base)] = (base, hidden_at(base, finetuned, base, encoded, cache_root))
        at_base = autolabel_losses(base, memo[id(base)][1], label_set, labelled.labels, mode)
    preconditioner = resolve(cfg.precondition, restricted_head=mode == "restricted")
    points, heads, blocks, timings = [], [], [], {}
    walk = None
    if cfg.path == "distill":
        task = Task("classification", data.seq_len, label_set, template=template, label_loss=mode)
        walk = Walk(texts, task, probs, expert_settings(base, finetuned), cache_root=cache_root)
    for start, end in segments(base, finetuned, cfg.pseudo_experts, cfg.path, walk):
        delta = label_rows(start, label_set)[0] - label_rows(end, label_set)[0]
        for at in gradient_points(start, end, cfg.grad_at):
            if id(at) not in memo:
                memo[id(at)] = (at, hidden_at(base, finetuned, at, encoded, cache_root))
            if mode == "full":
                delta_head, view = head_delta(start, end), head_view(at)
                if not (cfg.grad_blocks and delta_head.sq_norm() == 0):  # else only the blocks count
                    heads.append(
                        full_vocab_features(
                            memo[id(at)][1],
                            (view.weight, view.bias),
                            delta_head,
                            token_ids,
                            labelled.labels,
                            cfg.seed,
                        )
                    )
            else:
                points.append(GradientPoint(memo[id(at)][1], *label_rows(at, label_set), delta))
            if cfg.grad_blocks:
                loss = label_loss(at, label_set, labelled.labels, mode)
                loss_key = label_loss_key(label_set, labelled.labels, mode)
                block, block_timings = block_part(
                    start, end, at, encoded, loss, loss_key, cfg, cache_root, preconditioner != "none", corpus
                )
                blocks += [block] if block is not None else []
                timings = merge_timings(timings, block_timings)
        memo = {key: value for key, value in memo.items() if value[0] in (finetuned, end)}
    metric = None
    if len(points) == 1:  # the synthesisers' objective, which they rescale the same way
        metric = fit_metric(points[0].errors(labelled.labels), points[0].hidden, preconditioner, corpus)
    if points:
        total_delta = label_rows(base, label_set)[0] - tuned_rows[0]
        heads = as_list(
            head_features(points, labelled.labels, cfg.path_combine, total_delta, preconditioner, corpus)
        )
    if cfg.projection_dim:
        heads = [jl_project(part, cfg.projection_dim, cfg.projection, cfg.seed) for part in heads]
    parts, note = changed_parts(heads, blocks)
    timings["features_s"] = round(time.time() - started, 2)
    applied = {"precondition": preconditioner, "finetune_scope": scope}
    if asked == AUTO:  # what recover runs for --strategy auto on these gradients
        applied["auto_strategy"] = cfg.strategy
    notes = timings | note | task_notes(template, mode) | applied
    return CorpusGradients(
        joined(parts),
        labelled.labels,
        labelled.losses,
        notes,
        probs=labelled.probs,
        adapter=adapter_of(finetuned),
        metric=metric,
        base_losses=at_base,
    )


def autolabel_losses(
    at: LoadedModel, hidden: torch.Tensor, label_set: LabelSet, labels: torch.Tensor, mode: str
) -> torch.Tensor:
    """(N,) the cross-entropy of each document's label under `at`, from its last hidden states
    (N, d): over the label tokens (the restricted loss) or the whole vocabulary (`full`)."""
    if mode == "full":
        head = head_view(at)
        return vocab_losses(hidden, (head.weight, head.bias), torch.tensor(label_set.token_ids)[labels])
    return label_losses(label_probs(hidden, *label_rows(at, label_set)), labels)


QUOTA_LABELS = range(2, 11)  # label counts where --strategy auto sets a quota per label (measured: 2-6, 10)
TOPK_LABELS = range(3, QUOTA_LABELS.stop)  # of those, where top-k fills the quotas instead of greedy
# with --grad-blocks, auto's top-k balanced up to this k (measured: it led at 100, lost at 300 and 1000)
BLOCK_TOPK_MAX_K = 100


def resolve_strategy(cfg: SelectConfig, num_labels: int | None, label_loss: str) -> SelectConfig:
    """`cfg` with `--strategy auto` made one strategy (auto_strategy), saying which in the log."""
    if cfg.strategy != AUTO:
        return cfg
    chosen = auto_strategy(cfg, num_labels, label_loss)
    if num_labels is None:  # language modelling: no preconditioner applies
        log.info("--strategy auto: %s", chosen.strategy)
    else:
        log.info("--strategy auto: %s, --precondition %s", chosen.strategy, chosen.precondition)
    return chosen


def auto_strategy(cfg: SelectConfig, num_labels: int | None, label_loss: str) -> SelectConfig:
    """What `--strategy auto` runs, each branch the line that measured best where it applies
    (benchmarks/RESULTS.md, "Choosing the strategy without the test set" and the sections it
    links; the README's "What `--strategy auto` runs" gives the figures):

    - language modelling (no labels): the loss drop, which alone beat random there; greedy when
      an option asks gradients to shape the selection (--grad-blocks, --pseudo-experts,
      --grad-at, --rounds, --pool).
    - --grad-blocks, 3-10 labels, k <= BLOCK_TOPK_MAX_K, the label-token loss, --precondition
      auto or adam: top-k balanced on Adam-preconditioned head and block gradients (led greedy in
      every seed of AG News top:4 at k = 100; greedy led at k = 300 and 1000, hence the bound).
      In AG News' three-label full finetune it beat greedy on the same blocks in the mean, but
      both trailed the head's whitened top-k, so the README advises no --grad-blocks there.
    - the full-vocabulary loss, 2-10 labels: balanced greedy on the raw gradients (no whitening
      there). An expert trained that way follows its own label skew on the corpus and plain
      greedy's picks follow it (a Trainer classifier, a LoRA adapter).
    - the label-token loss, head gradients, 2-10 labels, --precondition auto or kfac: a quota
      per label on K-FAC-whitened gradients, filled by greedy for two labels and by top-k for
      three to ten (measured at 2-6 and 10 labels, in the head, top:2, top:4 and full regimes;
      seven to nine lie between measured counts). No line wins two labels of a full finetune: see
      the README for choosing among them without a test split.
    - greedy otherwise (11 labels or more: with 20 the quota lost; 11-19 are unmeasured; with
      --grad-blocks and two labels it led top-k balanced in IMDB top:4 and trailed it in Rotten
      Tomatoes' full finetune, where the README advises no --grad-blocks)."""
    if num_labels is None:
        shaped = cfg.grad_blocks or cfg.pseudo_experts > 1 or cfg.grad_at != "finetuned" or cfg.rounds > 1
        return replace(cfg, strategy="greedy" if shaped or cfg.pool > 0 else "loss_drop")
    if (
        cfg.grad_blocks
        and cfg.k <= BLOCK_TOPK_MAX_K
        and num_labels in TOPK_LABELS
        and label_loss == "restricted"
        and cfg.precondition in ("auto", "adam")
    ):
        return replace(cfg, strategy="topk_balanced", precondition="adam")
    if label_loss == "full" and num_labels in QUOTA_LABELS:  # check_full_loss refuses adam or kfac
        return replace(cfg, strategy="greedy_balanced", precondition=resolve(cfg.precondition, False))
    quota = (
        num_labels in QUOTA_LABELS
        and label_loss == "restricted"
        and not cfg.grad_blocks
        and cfg.precondition in ("auto", "kfac")
    )
    if not quota:
        return replace(cfg, strategy="greedy")
    strategy = "topk_balanced" if num_labels in TOPK_LABELS else "greedy_balanced"
    return replace(cfg, strategy=strategy, precondition="kfac")


def check_full_loss(cfg: SelectConfig) -> None:
    """What full-vocabulary head gradients (gradients.full_vocab_features) do not support."""
    several = cfg.pseudo_experts > 1 or cfg.grad_at == "both"
    if cfg.precondition not in ("auto", "none") or cfg.projection_dim:
        raise W2DError(
            "--precondition and --projection-dim need --label-loss restricted (the C × d gradients)"
        )
    if several and cfg.path_combine == "sum":
        raise W2DError("full-vocabulary gradients taken at several weights join by --path-combine concat")


def changed_parts(heads: list, blocks: list) -> tuple[list, dict]:
    """The head's feature parts and the blocks', without the head's when it did not change and the
    blocks did (a LoRA adapter that leaves the head as it is): gradients of weights the finetune
    did not move only add to every norm."""
    if not heads and not blocks:
        raise W2DError("the finetuned weights equal the base weights in the LM head and in every block")
    if blocks and all(part.delta_sq_norm <= 0 for part in heads):
        log.info("the LM head is unchanged: selecting on the gradients of the changed blocks alone")
        return blocks, {"gradients": "changed blocks only (the LM head is unchanged)"}
    return heads + blocks, {}


def task_notes(template: Template, label_loss: str = "restricted") -> dict:
    """The template and label loss a selection used, for its summary (when not the defaults)."""
    notes = {} if template.plain else {"template": template.describe()}
    return notes | ({"label_loss": label_loss} if label_loss != "restricted" else {})


def adapter_of(finetuned: LoadedModel) -> str | None:
    return None if finetuned.adapter is None else finetuned.adapter.describe()


def label_loss(
    at: LoadedModel, label_set: LabelSet, labels: torch.Tensor, mode: str = "restricted"
) -> BatchLoss:
    """The summed classification loss of a batch from its final hidden states, under `at`'s head:
    over the label tokens (`restricted`) or the whole vocabulary (`full`)."""
    device = next(at.model.parameters()).device  # moved there once, not per batch
    if mode == "full":
        view = head_view(at)
        weight, bias = view.weight.to(device), None if view.bias is None else view.bias.to(device)
        labels = torch.tensor(label_set.token_ids, device=device)[labels.to(device)]
    else:
        weight, bias = (None if x is None else x.to(device) for x in label_rows(at, label_set))
        labels = labels.to(device)

    def batch_loss(final: torch.Tensor, _batch: Encoded, index: slice) -> torch.Tensor:
        return F.cross_entropy(F.linear(final[:, -1], weight, bias), labels[index], reduction="sum")

    return batch_loss


def label_loss_key(label_set: LabelSet, labels: torch.Tensor, mode: str = "restricted") -> str:
    """What label_loss computes, beyond the model: its label set and the labels (a cache key part)."""
    key = f"labels:{stable_hash([label_set.to_dict(), labels.tolist()])}"
    return key if mode == "restricted" else f"{key}:{mode}"


def as_list(features: GradientFeatures | list) -> list:
    return features if isinstance(features, list) else [features]


def joined(parts: list) -> GradientFeatures:
    """One feature object: a single part as it is, several as the concatenation of their gradients."""
    return parts[0] if len(parts) == 1 else SummedFeatures(parts)


def merge_timings(total: dict, new: dict) -> dict:
    """Seconds add up over the points of a path; other entries keep their latest value."""
    merged = dict(total)
    for key, value in new.items():
        merged[key] = round(merged.get(key, 0) + value, 2) if key.endswith("_s") else value
    return merged


def finetuned_hidden(
    base: LoadedModel, finetuned: LoadedModel, texts: list[str], data: DataConfig, cache_root: Path | None
) -> tuple[Template, Encoded, torch.Tensor]:
    """The classification prompt of `texts` in the finetuned model's template, and its (N, d) last
    hidden states there (the unchanged lower blocks read from the cache)."""
    template = resolve_template(data.template, data.chat_template, finetuned.meta)
    encoded = encode(template, finetuned.tokenizer, texts, data.seq_len, "classification")
    return template, encoded, hidden_at(base, finetuned, finetuned, encoded, cache_root)


def finetuned_predictions(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    label_set: LabelSet,
    data: DataConfig,
    cache_root: Path | None,
) -> torch.Tensor:
    """(N,) the finetuned model's most likely label for each text."""
    hidden = finetuned_hidden(base, finetuned, texts, data, cache_root)[2]
    return label_probs(hidden, *label_rows(finetuned, label_set)).argmax(dim=1)


def task_gradients(
    base: LoadedModel,
    finetuned: LoadedModel,
    texts: list[str],
    task: Task,
    data: DataConfig,
    cfg: SelectConfig,
    cache_root: Path | None,
    base_losses: bool = False,
) -> CorpusGradients:
    """The corpus gradients of the task the expert was finetuned for: LM or classification, in its
    template and with its label loss (`base_losses`: see corpus_gradients)."""
    if task.kind == "lm":
        return lm_corpus_gradients(
            base, finetuned, texts, task.seq_len, task.lm_loss, cfg, cache_root, task.template, base_losses
        )
    data = task_data(data, task)
    return corpus_gradients(base, finetuned, texts, task.label_set, data, cfg, cache_root, base_losses)


def task_data(data: DataConfig, task: Task) -> DataConfig:
    """`data` in the template and label loss the expert was finetuned with."""
    return replace(
        data, template=task.template.text, chat_template=task.template.chat, label_loss=task.label_loss
    )


def generation_labeller(
    base: LoadedModel, finetuned: LoadedModel, label_set: LabelSet, data: DataConfig
) -> Labeller:
    """The finetuned model's most likely label for generated texts, in `data`'s template: what
    --generate-per-label conditions on."""
    template = resolve_template(data.template, data.chat_template, finetuned.meta)
    key = stable_hash(
        {"tokens": label_set.tokens, "template": [template.text, template.chat], "seq_len": data.seq_len}
    )

    def label(texts: list[str]) -> torch.Tensor:
        return finetuned_predictions(base, finetuned, texts, label_set, data, None)

    return Labeller(label, len(label_set.names), key)


def block_part(
    start: LoadedModel,
    end: LoadedModel,
    at: LoadedModel,
    encoded: Encoded,
    batch_loss: BatchLoss,
    loss_key: str,
    cfg: SelectConfig,
    cache_root: Path | None,
    precondition: bool = False,
    corpus: CorpusSlice = WHOLE,
) -> tuple[GradientFeatures | None, dict]:
    """The gradients of the top changed blocks at `at`, against the segment start − end (--grad-blocks);
    `loss_key` names what `batch_loss` computes, for their cache key. With `precondition` (any
    --precondition but none: kfac's full-matrix whitening has no per-layer counterpart here), each
    layer's are rescaled by its own Adafactor estimate, as the head's are by adam (from a pilot of
    the whole `corpus`)."""
    blocks = block_features(
        start,
        end,
        encoded,
        batch_loss,
        blocks=cfg.grad_blocks,
        dim=cfg.block_sketch_dim,
        projection=cfg.projection,
        seed=cfg.seed,
        cache_root=cache_root,
        loss_key=loss_key,
        at=at,
        precondition=precondition,
        corpus=corpus,
    )
    if blocks is None:
        log.warning(
            "--grad-blocks %d: the finetune changed no decoder block; using the head's gradients only",
            cfg.grad_blocks,
        )
        return None, {"gradient_blocks": "none changed"}
    notes = {"block_precondition": "adafactor" if precondition else "none", "block_layers": blocks.layers}
    return blocks.features, {**blocks.timings, **notes}


def drop_losses(
    grads: CorpusGradients, cfg: SelectConfig, strategy: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The losses (N,) under the finetuned model and the base that `strategy` ranks by: each
    document's summed next-token losses for a loss drop with --loss-drop-per document."""
    if cfg.loss_drop_per == "token" or strategy not in LOSS_DROP:
        return grads.losses, grads.base_losses
    if grads.tokens is None:
        raise W2DError(ONE_TOKEN_DROP)
    return grads.losses * grads.tokens, grads.base_losses * grads.tokens


def check_lm_selection(cfg: SelectConfig, strategies: list[str]) -> None:
    """A language-modelling selection has no labels: refuse the options that need them, before any work."""
    balanced = [s for s in strategies if s in BALANCED]
    if balanced:
        raise W2DError(
            f"{balanced[0]} balances labels, and a language-modelling selection has none: "
            "use topk (or greedy)"
        )
    if cfg.precondition not in ("auto", "none"):
        raise W2DError(
            f"--precondition {cfg.precondition} rescales classification head gradients (C × d), and a "
            "language-modelling selection has none: leave it unset (auto) or pass --precondition none"
        )
    if cfg.labels == "random" or cfg.label_set:
        option = "--labels random" if cfg.labels == "random" else f"--label-set {cfg.label_set}"
        raise W2DError(
            f"{option} labels the picks, and a language-modelling selection has none: leave it unset, "
            "or pass --task classification"
        )


def recover(
    grads: CorpusGradients,
    corpus_texts: list[str],
    label_set: LabelSet | None,
    cfg: SelectConfig,
    strategy: str | None = None,
    progress: bool = True,
    exclude: torch.Tensor | None = None,
    selector: Callable[..., Selection] = select,
) -> Recovery:
    """Run one strategy over precomputed corpus gradients (never picking the rows in `exclude`).

    The gradients are preconditioned as corpus_gradients chose (grads.timings["precondition"]):
    a `strategy` named here runs on those, e.g. on K-FAC-whitened ones where `--strategy auto`
    asked for them; compute them with that strategy's own config to get its default preconditioner.

    `selector`: selection.select, or a function with its signature (distributed.sharded_select over
    the ranks' rows)."""
    strategy = strategy or cfg.strategy
    if strategy == AUTO:  # as corpus_gradients resolved it, with the preconditioner it applied
        if "auto_strategy" not in grads.timings:
            raise W2DError(
                "--strategy auto is resolved where the gradients are computed, and these were computed "
                "for a named strategy: name it here too, or compute them with --strategy auto"
            )
        strategy = grads.timings["auto_strategy"]
    if grads.labels is None:
        check_lm_selection(cfg, [strategy])
    # without a weight change every loss drop is zero too: nothing to rank
    if strategy not in ("p_min", "p_max", "random") and grads.features.delta_sq_norm <= 0:
        raise W2DError(zero_delta_message(grads, cfg))
    unsure = unsure_rows(grads, cfg.keep_confident)
    if len(unsure):
        exclude = unsure if exclude is None else torch.cat([exclude, unsure]).unique()
        left = len(grads.labels) - len(exclude)
        if left < cfg.k:
            raise W2DError(
                f"--keep-confident {cfg.keep_confident} leaves {left} of the {len(grads.labels)} "
                f"documents to pick from, fewer than k = {cfg.k}: raise it or lower --k"
            )
    prior = label_prior(cfg.label_prior, grads, label_set)
    if cfg.pool and strategy in WITHOUT_GRADIENTS:
        log.warning(
            "--pool %g narrows by gradient cosine, and %s ranks without gradients: ignored",
            cfg.pool,
            strategy,
        )
    losses, base_losses = drop_losses(grads, cfg, strategy)
    started = time.time()
    selection = selector(
        strategy,
        grads.features,
        cfg.k,
        labels=grads.labels,
        losses=losses,
        base_losses=base_losses,
        seed=cfg.seed,
        batch_size=cfg.batch_reset,
        num_labels=None if label_set is None else len(label_set.names),
        label_prior=prior,
        exclude=exclude,
        weights=unit_weights(grads.features) if cfg.normalize == "unit" else None,
        pool=cfg.pool,
        progress=progress,
    )
    rows = selection.indices
    labels = None if grads.labels is None else grads.labels[rows]
    summary = {
        "strategy": strategy,
        "k": cfg.k,
        "corpus_size": len(corpus_texts),
        "objective_cos": selection.objective,
        "select_s": round(time.time() - started, 2),
        **({"greedy_engine": selection.engine} if selection.engine else {}),
        **grads.timings,
        "config": to_dict(cfg),
    }
    if grads.kind != "classification":
        summary["task"] = grads.kind
    if len(unsure):
        summary["unsure_skipped"] = len(unsure)
    if labels is not None:
        summary["label_distribution"] = label_distribution(labels, label_set)
    if grads.probs is not None and grads.labels is not None:
        summary["label_confidence"] = label_confidence(grads, rows)
    return Recovery(
        rows, [corpus_texts[i] for i in rows.tolist()], labels, label_set, selection.scores, summary
    )


def unsure_rows(grads: CorpusGradients, share: float) -> torch.Tensor:
    """(M,) the corpus rows outside the `share` of each autolabel's documents that the finetuned
    model gives that label most probability: greedy may favour documents the expert is unsure
    of, whose head gradients are largest and whose autolabels are least reliable (the summary's
    label_confidence shows whether it did)."""
    if share >= 1:
        return torch.empty(0, dtype=torch.long)
    if grads.probs is None:
        raise W2DError(
            "--keep-confident needs a classification task: it ranks documents by the "
            "finetuned model's probability of their label"
        )
    confidence = autolabel_probs(grads)
    dropped = []
    for label in grads.labels.unique():
        rows = (grads.labels == label).nonzero().squeeze(1)
        order = confidence[rows].argsort(descending=True)
        dropped.append(rows[order[math.ceil(share * len(rows)) :]])
    return torch.cat(dropped).sort().values


def zero_delta_message(grads: CorpusGradients, cfg: SelectConfig) -> str:
    """Why no document can explain the weight change: it is zero where the gradients were taken."""
    if grads.adapter is not None:
        return (
            f"the LoRA adapter ({grads.adapter}) changes no weight: every B factor is zero, as peft "
            "initialises an adapter before training. Pass the trained adapter (its adapter_model."
            "safetensors after training), or check that training saved it"
        )
    where = "the LM head's label rows" if grads.kind == "classification" else "the LM head"
    if grads.kind == "classification" and (grads.timings.get("label_loss") == "full"):
        where = "the LM head"
    blocks = " and the chosen blocks" if cfg.grad_blocks else ""
    return (
        f"the finetuned weights equal the base weights in {where}{blocks}, the parameters whose "
        "gradients were taken: the same model twice, or a finetune that left them unchanged (a "
        "frozen head; a LoRA adapter merged into the weights). Pass another --finetuned, or "
        "--grad-blocks -1 for every changed block (`w2d inspect` shows which layers changed)"
    )


def label_distribution(labels: torch.Tensor, label_set: LabelSet) -> dict[str, int]:
    """How many selected documents carry each label, by label name."""
    counts = torch.bincount(labels, minlength=len(label_set.names)).tolist()
    return dict(zip(label_set.names, counts, strict=True))


def generated_label_distribution(
    grads: CorpusGradients, sources: list[str], label_set: LabelSet | None
) -> dict[str, int] | None:
    """How many generated candidates the finetuned model gave each label (None: no label set, or
    nothing generated)."""
    if label_set is None or GENERATED not in sources:
        return None
    generated = torch.tensor([source == GENERATED for source in sources])
    return label_distribution(grads.labels.cpu()[generated].long(), label_set)


def sparse_labels(distribution: dict[str, int]) -> list[str]:
    """The labels holding under half an equal share of the picks. On finetunes whose autolabels
    lean to one label, plain greedy's picks leaned further (3-6 negatives in 100 on a LoRA
    sentiment adapter) and trained a model at chance, where per-label quotas recovered most of
    the accuracy; on our own AG News experts, whose picks held as few as 6 % Business, quotas
    moved accuracy by a few points either way (benchmarks/RESULTS.md)."""
    total = sum(distribution.values())
    return [name for name, n in distribution.items() if total and n < 0.5 * total / len(distribution)]


def autolabel_probs(grads: CorpusGradients) -> torch.Tensor:
    """(N,) the finetuned model's probability (over the label set) of each document's label."""
    return grads.probs.gather(1, grads.labels.long()[:, None]).squeeze(1)


def label_confidence(grads: CorpusGradients, rows: torch.Tensor) -> dict[str, float]:
    """The mean of autolabel_probs among the picks and over the whole corpus: whether a strategy
    favours documents the expert is sure of (picked above corpus) or unsure of (below)."""
    confidence = autolabel_probs(grads).double()
    return {"picked": confidence[rows].mean().item(), "corpus": confidence.mean().item()}


def label_prior(spec: str, grads: CorpusGradients, label_set: LabelSet | None) -> torch.Tensor | None:
    """The label shares the balanced strategies aim at: uniform, the finetuned model's mean
    prediction over the corpus, or weights given one per label."""
    if label_set is None or spec == "uniform":
        return None
    if spec == "predicted":
        return grads.probs.double().mean(0)
    weights = torch.tensor([float(w) for w in spec.split(",")], dtype=torch.float64)
    if len(weights) != len(label_set.names):
        raise W2DError(f"--label-prior gives {len(weights)} weights for {len(label_set.names)} labels")
    return weights


def write_recovery(recovery: Recovery, out_dir: Path) -> tuple[Path, Path]:
    """selection.parquet (text, label, label_name, corpus_row, rank, score, source) + summary.json."""
    columns = {"text": recovery.texts}
    if recovery.labels is not None:
        columns |= {"label": recovery.labels.tolist(), "label_name": recovery.label_names()}
    columns |= {
        "corpus_row": recovery.rows.tolist(),
        "rank": list(range(len(recovery.texts))),
        "score": recovery.scores.float().tolist(),
        "source": recovery.sources or ["corpus"] * len(recovery.texts),
    }
    table = pa.table(columns)
    parquet, summary = out_dir / "selection.parquet", out_dir / "summary.json"
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    if recovery.label_set is not None:
        write_json(out_dir / "labels.json", recovery.label_set.names)
    write_json(summary, recovery.summary)
    return parquet, summary
