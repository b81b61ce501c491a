"""Finetuning and evaluation, for classification (label-token loss) and language modelling.

A train scope splits the model into a frozen lower part and a trained upper part:
`full` trains everything; `head` trains the LM head (for classification only the label
rows: a linear probe on the last hidden state); `top:N` trains the last N blocks, the
final norm and the head. The frozen part runs once per document and its outputs are
cached, so head and top scopes cost a fraction of a full finetune.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weights2data.config import DataConfig, EvalConfig, FinetuneConfig, parse_scope, to_dict
from weights2data.data import Dataset, Encoded, LabelSet, Split, make_label_set, scored_positions
from weights2data.errors import W2DError
from weights2data.features import cache_key, hidden_states, run_top_layers
from weights2data.models import LoadedModel, decoder_layers, untie_head
from weights2data.store import key_matches, read_json, stable_hash, touch, write_json
from weights2data.templates import PLAIN, Template, encode, resolve_template

log = logging.getLogger(__name__)

# the version of train_eval's stopping and selection rules, part of its cache key: 2 = the honest
# figure's stop reads the validation split only (in 1 training went on while the test metric improved)
TRAIN_EVAL_PROTOCOL = 2


@dataclass(frozen=True)
class Task:
    """What the model learns: which tokens are scored and how texts become token ids.

    `label_loss` (classification): `restricted`, cross-entropy over the label tokens' logits only
    (the original's), or `full`, over the whole vocabulary at the label position.
    """

    kind: str  # classification | lm
    seq_len: int
    label_set: LabelSet | None = None
    lm_loss: str = "full"
    template: Template = PLAIN
    label_loss: str = "restricted"

    def encode(self, loaded: LoadedModel, texts: list[str]) -> Encoded:
        return encode(self.template, loaded.tokenizer, texts, self.seq_len, self.kind)

    def to_dict(self) -> dict:
        label_set = self.label_set.to_dict() if self.label_set else None
        out = {"kind": self.kind, "seq_len": self.seq_len, "label_set": label_set, "lm_loss": self.lm_loss}
        # written only when not the default, so the cache keys of default tasks stay as they were
        if not self.template.plain:
            out["template"] = self.template.to_dict()
        if self.label_loss != "restricted":
            out["label_loss"] = self.label_loss
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        label_set = LabelSet.from_dict(d["label_set"]) if d.get("label_set") else None
        template = Template.from_dict(d.get("template"))
        return cls(
            d["kind"], int(d["seq_len"]), label_set, d.get("lm_loss", "full"), template, label_loss_of(d)
        )


def label_loss_of(task: dict | None) -> str:
    return (task or {}).get("label_loss") or "restricted"


def resolve_task(data: DataConfig, dataset: Dataset, loaded: LoadedModel, lm_loss: str = "full") -> Task:
    """Classification when asked, or when `auto` and the dataset has labels; else language modelling.

    The template and the label loss: the flags, else what `loaded` recorded, else the defaults.
    """
    kind = data.task
    if kind == "auto":
        kind = "classification" if dataset.has_labels else "lm"
    if kind == "classification" and not dataset.has_labels:
        raise W2DError(
            f"dataset '{dataset.name}' has no labels (column '{data.label_column or 'label'}'); use --task lm"
        )
    template = resolve_template(data.template, data.chat_template, loaded.meta)
    label_set = (
        make_label_set(dataset.label_names, loaded.tokenizer, data.verbalizer, template)
        if kind == "classification"
        else None
    )
    label_loss = data.label_loss or label_loss_of(loaded.meta.get("task"))
    return Task(kind, data.seq_len, label_set, lm_loss, template, label_loss)


def labelled_split(dataset: Dataset, split: Split, task: Task) -> Split:
    """`split` (of `dataset`) with labels in the task's label set, or a clear refusal.

    The same label names, or bare ids (a file without labels.json) within the set, are taken as
    they are; names listed in another order or given by their label words (a selection whose
    labels were discovered: `positive,negative` against a dataset's `neg,pos`) are renumbered.
    """
    if task.kind != "classification":
        return split
    names = task.label_set.names
    if split.labels is None:
        raise W2DError(f"dataset '{dataset.name}' has no labels, but the task is classification ({names})")
    given = dataset.label_names or []
    if given not in (names, [str(i) for i in range(len(given))]):
        split = Split(split.texts, label_mapping(dataset, task)[split.labels])
        log.info("labels %s of '%s' matched to the task's %s", given, dataset.name, names)
    if len(split) and split.labels.max() >= len(names):
        raise W2DError(f"dataset '{dataset.name}' has label ids beyond the {len(names)} labels {names}")
    return split


def label_mapping(dataset: Dataset, task: Task) -> np.ndarray:
    """(C,) the task's label id of each of the dataset's labels, matched by name or label word."""
    words = [token.strip() for token in task.label_set.tokens]
    known = list(zip(task.label_set.names, words, strict=True))
    names = dataset.label_names
    index = {i: j for i, name in enumerate(names) for j, pair in enumerate(known) if name in pair}
    if sorted(index) != list(range(len(dataset.label_names))):
        raise W2DError(
            f"dataset '{dataset.name}' has the labels {dataset.label_names}, but the task's are "
            f"{task.label_set.names}"
        )
    return np.array([index[i] for i in range(len(dataset.label_names))])


class ScopedModel:
    """A model split at its train scope, with the trainable parameters switched on."""

    def __init__(self, loaded: LoadedModel, scope: str, task: Task, training: bool = True) -> None:
        self.loaded, self.task = loaded, task
        self.kind, n_top = parse_scope(scope)
        model = loaded.model
        model.requires_grad_(self.kind == "full" and training)
        self.untied = untie_head(model) if self.kind != "full" and training else False
        self.head = model.get_output_embeddings()
        self.label_rows: torch.nn.Parameter | None = None
        self.first_trained_layer: int | None = None
        restricted = task.kind == "classification" and task.label_loss == "restricted"
        if self.kind != "full" and restricted:
            # only the label rows of an untied head receive gradient: train them as a (C, d) matrix
            self.label_rows = torch.nn.Parameter(self.head.weight[self._label_ids()].detach().clone())
        elif self.kind != "full":
            self.head.requires_grad_(training)
        if self.kind == "top":
            layers = decoder_layers(model)
            if n_top > len(layers):
                raise W2DError(f"top:{n_top} asks for more blocks than the model has ({len(layers)})")
            if not hasattr(model.base_model, "rotary_emb"):
                raise W2DError("top:N scopes support Llama-family models; use head or full for this model")
            self.first_trained_layer = len(layers) - n_top
            for module in (*layers[self.first_trained_layer :], model.base_model.norm):
                module.requires_grad_(training)

    def _label_ids(self) -> torch.Tensor:
        return torch.tensor(self.task.label_set.token_ids, device=self.head.weight.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        body = [p for p in self.loaded.model.parameters() if p.requires_grad]
        return body + ([self.label_rows] if self.label_rows is not None else [])

    def values_in(self, other: LoadedModel) -> list[torch.Tensor]:
        """`other`'s value of every trained weight, in `parameters()` order (same architecture).

        Tied weights are listed under each of their names, so a head this model untied to train it
        reads `other`'s tied head, which is its embedding matrix.
        """
        weights = dict(other.model.named_parameters(remove_duplicate=False))
        names = [name for name, p in self.loaded.model.named_parameters() if p.requires_grad]
        out = [weights[name].detach() for name in names]
        if self.label_rows is not None:
            head = other.model.get_output_embeddings().weight
            out.append(head[self._label_ids().to(head.device)].detach())
        return out

    def frozen_outputs(self, encoded: Encoded, cache_root: Path | None) -> torch.Tensor | None:
        """What the trained part reads, computed once: None for full (it reads token ids)."""
        if self.kind == "full":
            return None
        last_only = self.kind == "head" and self.task.kind == "classification"
        return hidden_states(
            self.loaded,
            encoded,
            layer=self.first_trained_layer,
            last_only=last_only,
            cache_root=cache_root,
            desc="frozen features",
        )

    def final_hidden(self, frozen: torch.Tensor | None, batch: Encoded) -> torch.Tensor:
        """(B, T, d) final normed hidden states, or (B, d) for a cached classification probe."""
        device = self.head.weight.device
        if self.kind == "head":
            return frozen.to(device)
        if self.kind == "top":
            return run_top_layers(self.loaded.model, frozen.to(device), batch, self.first_trained_layer)
        return self.loaded.model.base_model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
        ).last_hidden_state

    def logits(self, frozen: torch.Tensor | None, batch: Encoded) -> torch.Tensor:
        """Classification: (B, C) over the label tokens at the last position. LM: (B, T, V)."""
        hidden = self.final_hidden(frozen, batch)
        if self.task.kind == "lm":
            return self.head(hidden)
        return self.label_logits(last_position(hidden))

    def label_logits(self, last: torch.Tensor) -> torch.Tensor:
        """(B, C) the label tokens' logits from the last position's hidden states (B, d)."""
        rows = self.label_rows if self.label_rows is not None else self.head.weight[self._label_ids()]
        bias = None if getattr(self.head, "bias", None) is None else self.head.bias[self._label_ids()]
        return F.linear(last, rows, bias)

    def finalize(self) -> None:
        """Write a trained probe back into the label rows of the (untied) head."""
        if self.label_rows is not None:
            with torch.no_grad():
                self.head.weight[self._label_ids()] = self.label_rows.detach()


def batch_loss(
    scoped: ScopedModel, frozen: torch.Tensor | None, batch: Encoded, targets: torch.Tensor | None
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Summed loss over scored tokens, number of scored tokens, and whether each scored token
    (each example, in classification) was predicted right: a bool tensor."""
    if scoped.task.kind == "lm":
        return lm_loss_sum(scoped.logits(frozen, batch), batch, scoped.task.lm_loss)
    last = last_position(scoped.final_hidden(frozen, batch))
    targets = targets.to(last.device)
    if scoped.task.label_loss == "full":  # the whole vocabulary; the prediction is still a label's
        ids = scoped._label_ids()
        logits = scoped.head(last)
        loss = F.cross_entropy(logits, ids[targets], reduction="sum")
        return loss, len(targets), logits[:, ids].argmax(-1) == targets
    logits = scoped.label_logits(last)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, len(targets), logits.argmax(-1) == targets


def last_position(hidden: torch.Tensor) -> torch.Tensor:
    """(B, d): a cached probe's states as they are, else the last position of (B, T, d)."""
    return hidden if hidden.dim() == 2 else hidden[:, -1]


def lm_loss_sum(logits: torch.Tensor, batch: Encoded, mode: str) -> tuple[torch.Tensor, int, int]:
    """Next-token loss over right-padded rows: every token (`full`) or the last one (`last`), of the
    completion when a template marks one."""
    ids = batch.input_ids.to(logits.device)
    scored = scored_positions(batch.attention_mask, mode, batch.target_mask)[:, :-1].to(logits.device)
    pred, target = logits[:, :-1][scored], ids[:, 1:][scored]
    loss = F.cross_entropy(pred, target, reduction="sum")
    return loss, int(scored.sum()), pred.argmax(-1) == target


def make_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Prepared:
    """Encoded examples with their targets and the frozen part's cached outputs."""

    encoded: Encoded
    targets: torch.Tensor | None  # (n,) label index for classification
    frozen: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor | None, Encoded, torch.Tensor | None]:
        frozen = None if self.frozen is None else self.frozen[index]
        targets = None if self.targets is None else self.targets[index]
        return frozen, self.encoded.subset(index), targets


def prepare(scoped: ScopedModel, split: Split, cache_root: Path | None) -> Prepared:
    if len(split) == 0:
        raise W2DError("cannot train or evaluate on an empty split")
    encoded = scoped.task.encode(scoped.loaded, split.texts)
    targets = None
    if scoped.task.kind == "classification":
        if split.labels is None:
            raise W2DError("classification needs labelled examples")
        targets = torch.as_tensor(split.labels, dtype=torch.long)
    return Prepared(encoded, targets, scoped.frozen_outputs(encoded, cache_root))


def train_epoch(
    scoped: ScopedModel,
    data: Prepared,
    optimizer: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    generator: torch.Generator,
    max_steps: int | None,
    desc: str,
) -> dict:
    """One shuffled pass (or fewer steps); returns the mean training loss and steps taken."""
    order = torch.randperm(len(data), generator=generator)
    batches = list(order.split(cfg.batch_size))[: max_steps if max_steps is not None else None]
    total, count = 0.0, 0
    scoped.loaded.model.train(scoped.kind == "full")
    bar = tqdm(
        batches, desc=desc, unit="step", leave=False, disable=len(batches) < 20 and scoped.kind != "full"
    )
    for index in bar:
        loss_sum, n, _ = batch_loss(scoped, *data.batch(index))
        loss = loss_sum / max(n, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss_sum.item(), count + n
        bar.set_postfix(loss=f"{loss.item():.4f}")
    scoped.loaded.model.eval()
    if not math.isfinite(total):
        raise W2DError("the training loss became NaN or inf; lower the learning rate")
    return {"train_loss": total / max(count, 1), "steps": len(batches)}


@torch.no_grad()
def evaluate_prepared(scoped: ScopedModel, data: Prepared, batch_size: int = 64) -> dict:
    """Mean loss and accuracy (classification, with the mean of the per-label accuracies) or loss
    and perplexity (LM) over `data`."""
    total, count, right = 0.0, 0, []
    batches = torch.arange(len(data)).split(batch_size)
    for index in tqdm(batches, desc="evaluate", unit="batch", leave=False, disable=len(batches) < 20):
        loss_sum, n, correct = batch_loss(scoped, *data.batch(index))
        total, count = total + loss_sum.item(), count + n
        if scoped.task.kind == "classification":
            right.append(correct.cpu())
    loss = total / max(count, 1)
    if scoped.task.kind == "classification":
        correct = torch.cat(right)  # (n,) bool, in the order of data.targets
        return {
            "loss": loss,
            "accuracy": int(correct.sum()) / max(count, 1),
            "balanced_accuracy": balanced_accuracy(correct, data.targets),
            "n": count,
        }
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def balanced_accuracy(correct: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean over the labels present in `targets` of the share of their examples predicted
    right: accuracy as if every label were equally common."""
    per_label = torch.bincount(targets, minlength=1).float()
    hits = torch.bincount(targets[correct], minlength=len(per_label)).float()
    present = per_label > 0
    return float((hits[present] / per_label[present]).mean())


def finetune(
    loaded: LoadedModel, train: Split, task: Task, cfg: FinetuneConfig, cache_root: Path | None = None
) -> dict:
    """Finetune `loaded` in place on `train`; returns the training history."""
    cfg = cfg.for_task(task.kind)
    torch.manual_seed(cfg.seed)
    scoped = ScopedModel(loaded, cfg.train_scope, task)
    data = prepare(scoped, train, cache_root)
    optimizer = make_optimizer(scoped.parameters(), cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, steps, epoch = [], 0, 0
    while (steps < cfg.steps) if cfg.steps is not None else (epoch < cfg.epochs):
        epoch += 1
        remaining = None if cfg.steps is None else cfg.steps - steps
        label = f"epoch {epoch}" + (f" (step {steps}/{cfg.steps})" if cfg.steps else f"/{cfg.epochs}")
        record = train_epoch(scoped, data, optimizer, cfg, generator, remaining, label)
        steps += record["steps"]
        history.append({"epoch": epoch, **record})
        log.info("epoch %d: train loss %.4f", epoch, record["train_loss"])
    scoped.finalize()
    check_trained(scoped)
    return {"history": history, "steps": steps, "untied_head": scoped.untied}


def check_trained(scoped: ScopedModel) -> None:
    """A step can overflow the weights even when every loss seen was finite."""
    if any(not torch.isfinite(p).all() for p in scoped.parameters()):
        raise W2DError("training diverged: the weights hold NaN or inf values; lower the learning rate")


def eval_rows(split: Split, max_rows: int, seed: int = 0) -> Split:
    """Up to max_rows shuffled rows (the same rows for every model evaluated with this seed)."""
    if len(split) <= max_rows:
        return split
    return split.subset(np.random.default_rng(seed).permutation(len(split))[:max_rows])


def evaluate(
    loaded: LoadedModel, test: Split, task: Task, cfg: EvalConfig, cache_root: Path | None = None
) -> dict:
    scope = "head" if task.kind == "classification" else "full"  # a probe reads cached hidden states
    scoped = ScopedModel(loaded, scope, task, training=False)
    data = prepare(scoped, eval_rows(test, cfg.max_eval_rows), cache_root)
    return evaluate_prepared(scoped, data, cfg.eval_batch_size)


def train_eval(
    loaded: LoadedModel,
    train: Split,
    test: Split,
    task: Task,
    ft: FinetuneConfig,
    ev: EvalConfig,
    cache_root: Path | None = None,
    reference: Split | None = None,
    finetuned: LoadedModel | None = None,
) -> dict:
    """Finetune on `train` epoch by epoch, scoring the test split after each epoch.

    Two protocols share one training run, each deciding as if it ran alone:
    - `best_epoch_test` (the original's): early stopping on the test metric, the best test
      metric over the epochs it ran — model selection on the test set;
    - `val_selected_test` (honest): the epoch and the stop are chosen on the loss of a
      validation split held out of `train`; with too few rows to hold one out, the last
      epoch of the fixed budget (`eval_epochs`). Under `ev.honest_by == "agreement"` they are
      chosen instead on the accuracy against `reference` — corpus documents labelled by the
      finetuned model, less any `train` holds — and every row of `train` is trained on. The
      test metric never enters its choices.
    A `reference` given under the validation protocol is only scored: the result then records
    the agreement (plain and per-label balanced) of the epoch the validation split chose.
    With `finetuned` (a model `loaded` was finetuned into) each epoch also records `weight_cos`,
    the cosine between the weight change training made so far and the finetune's, over the
    trained weights; the result holds the chosen epoch's. Neither protocol reads it.
    Training goes on until both have stopped; epochs past a protocol's own stop do not change
    its figure, so each equals what a run with that protocol alone would report.
    """
    ft = ft.for_task(task.kind)
    reference = agreement_split(reference, train, ev, task)
    run_key = scores_key(loaded, train, test, task, ft, ev, reference, finetuned)
    saved = (
        None if cache_root is None else Path(cache_root) / "train-eval" / f"{stable_hash(run_key, 20)}.json"
    )
    if saved is not None and saved.exists():
        log.info("reusing the scores of an identical training run: %s", saved)
        return read_scores(saved, run_key)
    torch.manual_seed(ft.seed)
    by_agreement = ev.honest_by == "agreement"
    fit_split, val_split = (train, None) if by_agreement else hold_out(train, ev.val_fraction, ft.seed)
    chosen_on = reference if by_agreement else val_split  # what the honest protocol reads
    scoped = ScopedModel(loaded, ft.train_scope, task)
    fit = prepare(scoped, fit_split, cache_root)
    val = prepare(scoped, val_split, cache_root) if val_split is not None else None
    agree = prepare(scoped, reference, cache_root) if reference is not None else None
    change = WeightChange(scoped, finetuned) if finetuned is not None else None
    test_data = prepare(scoped, eval_rows(test, ev.max_eval_rows), cache_root)
    optimizer = make_optimizer(scoped.parameters(), ft)
    generator = torch.Generator().manual_seed(ft.seed)
    key = "accuracy" if task.kind == "classification" else "loss"
    sign = 1.0 if key == "accuracy" else -1.0  # the original's test metric: higher is better
    original = EarlyStopping(ev.patience)  # reads the test metric
    honest = EarlyStopping(ev.patience if chosen_on is not None else ev.eval_epochs)  # never reads test
    epochs = []
    for epoch in range(1, ev.eval_epochs + 1):
        record = train_epoch(
            scoped, fit, optimizer, ft, generator, ft.steps, f"epoch {epoch}/{ev.eval_epochs}"
        )
        scoped.finalize()
        record.update({"epoch": epoch, "test": evaluate_prepared(scoped, test_data, ev.eval_batch_size)})
        if val is not None:
            record["val"] = evaluate_prepared(scoped, val, ev.eval_batch_size)
        if agree is not None:
            record["reference"] = evaluate_prepared(scoped, agree, ev.eval_batch_size)
        if change is not None:
            record["weight_cos"] = change.cosine()
        epochs.append(record)
        log.info("epoch %d: test %s %.4f", epoch, key, record["test"][key])
        original.update(record, sign * record["test"][key])
        honest.update(record, honest_score(record, by_agreement))
        if original.stopped and honest.stopped:
            break
    result = {
        "metric": key,
        "best_epoch_test": original.best["test"][key],
        "best_epoch": original.best["epoch"],
        "best_epoch_stop": original.last_epoch,
        "val_selected_test": honest.best["test"][key],
        "val_selected_epoch": honest.best["epoch"],
        "honest_stop": honest.last_epoch,
        "honest_rule": honest_rule(chosen_on, by_agreement),
        "epochs": epochs,
        "train_rows": len(fit_split),
        "val_rows": 0 if chosen_on is None else len(chosen_on),
    }
    if reference is not None:
        result["agreement"] = honest.best["reference"]["accuracy"]
        result["balanced_agreement"] = honest.best["reference"]["balanced_accuracy"]
    if change is not None:
        result["weight_cos"] = honest.best["weight_cos"]
    if saved is not None:
        write_json(saved, {"key": run_key, "scores": result})
    return result


class WeightChange:
    """cos(θ − θ0, θ1 − θ0) over the weights `scoped` trains: how closely training so far moved
    them the way the finetune did. θ0 is their value now."""

    def __init__(self, scoped: ScopedModel, finetuned: LoadedModel) -> None:
        self.scoped = scoped
        self.start = [p.detach().clone() for p in scoped.parameters()]
        self.target = [t - s for t, s in zip(scoped.values_in(finetuned), self.start, strict=True)]
        self.target_norm = math.sqrt(sum(float(t.double().square().sum()) for t in self.target))

    @torch.no_grad()
    def cosine(self) -> float:
        dot, norm = 0.0, 0.0
        for p, s, t in zip(self.scoped.parameters(), self.start, self.target, strict=True):
            d = (p - s).double()
            dot += float((d * t.double()).sum())
            norm += float(d.square().sum())
        return dot / max(math.sqrt(norm) * self.target_norm, 1e-30)


def agreement_split(reference: Split | None, train: Split, ev: EvalConfig, task: Task) -> Split | None:
    """The reference documents agreement is scored on (`--honest-by agreement` chooses by it), less
    those `train` holds (a model's agreement on its own training rows says nothing of what it
    learned); None without a reference under the validation protocol."""
    if reference is None and ev.honest_by != "agreement":
        return None
    if task.kind != "classification" or reference is None or reference.labels is None:
        raise W2DError(
            "--honest-by agreement needs corpus documents labelled by the finetuned model (w2d run "
            "on a classification task, or w2d train-eval --agreement-corpus); use --honest-by validation"
        )
    held = set(train.texts)
    kept = np.array([i for i, text in enumerate(reference.texts) if text not in held], dtype=np.int64)
    if len(kept) < 10:
        raise W2DError("--honest-by agreement: under 10 reference documents lie outside the training rows")
    return reference.subset(kept)


def honest_score(record: dict, by_agreement: bool) -> float:
    """What the honest protocol maximises; with no validation split every epoch counts as the
    best, so the budget's last one is chosen."""
    if by_agreement:
        return record["reference"]["accuracy"]
    return -record["val"]["loss"] if "val" in record else float(record["epoch"])


def honest_rule(chosen_on: Split | None, by_agreement: bool) -> str:
    if by_agreement:
        return f"best agreement with the finetuned model on {len(chosen_on)} corpus documents"
    return "best validation loss" if chosen_on is not None else "last epoch"


class EarlyStopping:
    """The best epoch by one score (higher is better); stopped once `patience` epochs bring no better one.

    Once stopped it ignores later epochs, so its choice is what a run that stopped there would make.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: dict | None = None
        self.best_score = -math.inf
        self.last_epoch = 0
        self.stopped = False

    def update(self, record: dict, score: float) -> None:
        if self.stopped:
            return
        self.last_epoch = record["epoch"]
        if self.best is None or score > self.best_score:
            self.best, self.best_score = record, score
        self.stopped = self.last_epoch - self.best["epoch"] >= self.patience


def scores_key(
    model: LoadedModel,
    train: Split,
    test: Split,
    task: Task,
    ft: FinetuneConfig,
    ev: EvalConfig,
    reference: Split | None = None,
    finetuned: LoadedModel | None = None,
) -> dict:
    """What the scores of a train-eval run depend on: weights, rows, task, settings, protocol,
    the agreement reference, the finetune whose weight change is compared, and the versions and
    device kind that train."""
    # the reference stands for --agreement-rows and, alone, for --honest-by agreement (so runs
    # without one, and earlier agreement runs, keep their keys)
    eval_settings = {k: v for k, v in to_dict(ev).items() if k not in ("honest_by", "agreement_rows")}
    if reference is not None:
        eval_settings["reference"] = reference.fingerprint
        if ev.honest_by != "agreement":
            eval_settings["honest_by"] = ev.honest_by
    if finetuned is not None:
        eval_settings["weight_cos_against"] = finetuned.fingerprint
    return cache_key(
        next(model.model.parameters()).device,
        model=model.fingerprint,
        train=train.fingerprint,
        test=test.fingerprint,
        task=task.to_dict(),
        finetune=to_dict(ft),
        eval=eval_settings,
        protocol=TRAIN_EVAL_PROTOCOL,
    )


def read_scores(path: Path, key: dict) -> dict:
    saved = read_json(path)
    if not key_matches(saved.get("key"), key):
        raise W2DError(f"train-eval cache {path} does not match its key; delete the file")
    touch(path)
    return saved["scores"]


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Carve a validation split from `train` (none when it would hold fewer than 10 rows)."""
    n_val = int(len(train) * fraction)
    if n_val < 10 or len(train) - n_val < 1:
        return train, None
    order = np.random.default_rng(seed + 1).permutation(len(train))
    return train.subset(np.sort(order[n_val:])), train.subset(np.sort(order[:n_val]))
