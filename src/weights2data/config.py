"""Typed configuration, one dataclass per stage, validated on construction.

The same objects serve the Python API, the CLI flags and TOML files: a TOML file
supplies defaults (a table per stage, e.g. `[finetune]`), explicit flags win, unknown
keys are errors.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from weights2data.errors import W2DError

OPTIMIZERS = ("adam", "adamw", "sgd")
TASKS = ("auto", "classification", "lm")
LM_LOSSES = ("full", "last")
LABEL_LOSSES = ("restricted", "full")
DTYPES = ("float32", "bfloat16", "float16")  # model weights (RuntimeConfig.dtype)
GRAD_AT = ("finetuned", "base", "both")  # where a path segment's gradients are taken
PATHS = ("linear", "distill")  # pseudo-expert paths from the base to the finetuned weights
NORMALIZE = ("none", "unit")  # how greedy weighs each document's gradient in its sum
DROP_PER = ("token", "document")  # language modelling's loss drop: mean or summed over a document
HONEST_BY = ("validation", "agreement")  # what picks the honest train-eval figure's epoch
DEFAULT_LR = {"full": 2e-5, "top": 1e-4, "head": 1e-3}  # measured on smollm2-135m / AG News
# a head-only LM finetune at 1e-3 overshoots within one epoch: its weight change carries no signal
DEFAULT_LM_LR = {"full": 2e-5, "top": 1e-4, "head": 1e-4}  # measured on smollm2-135m / IMDB texts


def opt(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field carrying its help text, shared by --help and the TOML schema."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = opt(
        "ag_news_1000",
        "dataset: a name (ag_news, imdb, wiki_passages, ...), NAME_N for N "
        "shuffled training rows, a parquet/csv/jsonl file or folder; several names "
        "separated by spaces are concatenated",
    )
    data_dir: str | None = opt(
        None, "folder holding <name>/{train,validation,test}.parquet and labels.json (default: $W2D_DATA_DIR)"
    )
    text_column: str = opt("text", "text column of local files")
    label_column: str | None = opt(
        None,
        "label column of local files; a column named here must exist (default: label, when there is one)",
    )
    verbalizer: str = opt(
        "letters",
        "token the model predicts for each label: letters (A, B, C, ... as the "
        "original), names (from labels.json) or a comma-separated list; each must be one token",
    )
    seq_len: int = opt(32, "tokens per example, the label token included; longer texts lose their start")
    task: str = opt("auto", "classification, lm, or auto (classification when the dataset has labels)")
    template: str | None = opt(
        None,
        "prompt template with one {text} slot (\\n: a newline), or a file holding it, e.g. "
        "'Review: {text}\\nSentiment:'; "
        "the label token follows it (LM: the text is the completion, the only part scored); "
        "truncation cuts the text, never the template. Default: the finetuned model's recorded "
        "template, else the original's `text label`",
    )
    chat_template: bool = opt(
        False,
        "use the tokenizer's chat template: the text is the user turn and the label the assistant turn "
        "(LM: the text is the assistant turn, the only part scored)",
    )
    label_loss: str | None = opt(
        None,
        "classification loss: restricted (cross-entropy over the label tokens only, the original's) or "
        "full (over the whole vocabulary at the label position, as a usual trainer); autolabels and "
        "gradients follow it. Default: the finetuned model's recorded loss, else restricted",
    )

    def __post_init__(self) -> None:
        check_types(self)
        _choice("task", self.task, TASKS)
        if self.label_loss is not None:
            _choice("label_loss", self.label_loss, LABEL_LOSSES)
        if self.template is not None and self.chat_template:
            raise W2DError(
                "--template and --chat-template exclude each other: the chat template is a template"
            )
        if self.seq_len < 2:
            raise W2DError(f"sequence length must be at least 2 (got {self.seq_len})")


@dataclass
class FinetuneConfig:
    optimizer: str = opt("adam", "adam (the original's default), adamw or sgd")
    lr: float | None = opt(
        None,
        "learning rate; default by scope: full 2e-5 (the original's), top:N 1e-4, head 1e-3 for "
        "classification (a probe on frozen features needs larger steps) and 1e-4 for language modelling",
    )
    batch_size: int = opt(32, "examples per optimiser step")
    epochs: int = opt(1, "passes over the training set (ignored when --steps is given)")
    steps: int | None = opt(None, "train exactly this many optimiser steps, cycling over the data")
    train_scope: str = opt(
        "full",
        "what is trained: full, head (the LM head; a linear probe for "
        "classification) or top:N (last N blocks + head); frozen parts run once",
    )
    lm_loss: str = opt(
        "full", "language modelling loss: full (every next token) or last (last token only, as the original)"
    )
    weight_decay: float = opt(0.0, "weight decay of the optimiser")
    seed: int = opt(0, "seed for shuffling, subsets and initialisation")

    def __post_init__(self) -> None:
        check_types(self)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lm_loss", self.lm_loss, LM_LOSSES)
        parse_scope(self.train_scope)
        if (
            (self.lr is not None and self.lr <= 0)
            or self.batch_size < 1
            or self.epochs < 1
            or (self.steps is not None and self.steps < 1)
        ):
            raise W2DError("lr must be > 0; batch size, epochs and steps at least 1")
        if self.weight_decay < 0:
            raise W2DError(f"weight decay must be >= 0 (got {self.weight_decay})")

    def for_task(self, kind: str) -> FinetuneConfig:
        """This config with the learning rate filled in for the task (classification | lm) if unset."""
        if self.lr is not None:
            return self
        defaults = DEFAULT_LM_LR if kind == "lm" else DEFAULT_LR
        return replace(self, lr=defaults[parse_scope(self.train_scope)[0]])


@dataclass
class EvalConfig:
    max_eval_rows: int = opt(2048, "test rows scored (a fixed shuffled subset, as the original)")
    eval_epochs: int = opt(10, "train-eval: most epochs on the training set (original: up to 100)")
    patience: int = opt(10, "train-eval: stop after this many epochs without improvement")
    val_fraction: float = opt(0.1, "train-eval: held out of the training set for honest early stopping")
    honest_by: str = opt(
        "validation",
        "train-eval: what picks the honest figure's epoch and stop: validation (the loss on "
        "val_fraction of the training set) or agreement (the share of agreement_rows corpus "
        "documents no training set holds on which the model predicts the finetuned model's label; "
        "w2d run, classification only: every row trains on all its documents)",
    )
    agreement_rows: int = opt(
        500, "train-eval: corpus documents agreement is scored on (--honest-by agreement, --agreement-corpus)"
    )
    eval_batch_size: int = opt(64, "evaluation batch size")

    def __post_init__(self) -> None:
        check_types(self)
        if self.max_eval_rows < 1 or self.eval_epochs < 1 or self.patience < 1 or self.eval_batch_size < 1:
            raise W2DError("max eval rows, eval epochs, patience and eval batch size must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise W2DError("val_fraction must lie in [0, 1)")
        _choice("honest_by", self.honest_by, HONEST_BY)
        if self.agreement_rows < 10:
            raise W2DError("agreement_rows must be at least 10")


def parse_scope(scope: str) -> tuple[str, int]:
    """'full' -> ('full', 0); 'head' -> ('head', 0); 'top:4' -> ('top', 4)."""
    if scope in ("full", "head"):
        return scope, 0
    match = re.fullmatch(r"top:(\d+)", scope)
    if not match or int(match.group(1)) < 1:
        raise W2DError(f"unknown train scope '{scope}': use full, head or top:N (N >= 1)")
    return "top", int(match.group(1))


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def select_overrides(text: str) -> dict[str, Any]:
    """'grad_at=base pseudo_experts=4' -> {'grad_at': 'base', 'pseudo_experts': 4}, typed by SelectConfig."""
    types = {f.name: f.type.replace(" | None", "") for f in fields(SelectConfig)}
    out: dict[str, Any] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise W2DError(f"'{item}' is not SETTING=VALUE of a select setting ({', '.join(types)})")
        kind = types[key]
        try:
            out[key] = {"int": int, "float": float}.get(kind, str)(value)
        except ValueError:
            raise W2DError(f"'{item}': {key} takes {'an' if kind == 'int' else 'a'} {kind}") from None
    return out


def check_types(config: Any) -> None:
    """Values from TOML files arrive untyped: refuse a string for a number and the like."""
    for f in fields(config):
        value = getattr(config, f.name)
        base, optional = f.type.replace(" | None", ""), " | None" in f.type
        allowed = _TYPES.get(base)
        if allowed is None or (value is None and optional):
            continue
        if not isinstance(value, allowed) or (base != "bool" and isinstance(value, bool)):
            raise W2DError(
                f"{f.name} must be {'an' if base == 'int' else 'a'} {base}"
                f"{' or unset' if optional else ''} (got {value!r})"
            )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise W2DError(f"unknown {name} '{value}': choose from {', '.join(allowed)}")


def to_dict(config: Any) -> dict:
    return asdict(config)


def load_toml(path: str | Path) -> dict[str, dict]:
    """Read a TOML config: one table per stage ([data], [finetune], [eval], [select], [run])."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise W2DError(f"could not read config file {path}: {exc}") from exc


def check_keys(table: Any, cls: type, section: str) -> None:
    if not isinstance(table, dict):
        raise W2DError(
            f"{section} must be a table ([{section}] followed by key = value lines), not {table!r}"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise W2DError(
            f"unknown key(s) in [{section}]: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


@dataclass
class RuntimeConfig:
    cache_dir: str | None = opt(
        None,
        "where converted models and feature caches live (default: $W2D_CACHE_DIR or ~/.cache/weights2data)",
    )
    results_dir: str = opt("runs", "parent folder of run directories")
    exp_name: str | None = opt(None, "run directory name (default: derived from the command and its inputs)")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto (cuda when available)")
    dtype: str = opt(
        "float32",
        "the models' weights and forward passes: float32, or bfloat16 / float16 on GPUs (half the "
        "memory, faster features; hidden states and gradient factors are still kept in float32). "
        "Meant for featurising (w2d select, inspect); finetuning is best left in float32",
    )
    device_map: str | None = opt(
        None,
        "auto: spread a model too large for one GPU over the GPUs (and the CPU) with accelerate, "
        "instead of --device",
    )
    allow_pickle: bool = opt(
        False, "allow loading pickle checkpoints (.bin/.pt): they can run arbitrary code"
    )
    wandb: bool = opt(False, "also log metrics to Weights & Biases (needs the wandb package)")

    def __post_init__(self) -> None:
        check_types(self)
        _choice("dtype", self.dtype, DTYPES)
        if self.device_map not in (None, "auto"):
            raise W2DError(f"device_map must be auto or unset (got {self.device_map!r})")
        if self.exp_name and (Path(self.exp_name).name != self.exp_name or self.exp_name == ".."):
            raise W2DError(
                f"exp_name must be a folder name, without '/' (got {self.exp_name!r}); "
                "--results-dir sets the folder it goes in"
            )


@dataclass
class SelectConfig:
    k: int = opt(1000, "number of corpus documents to select (the original's --select_full_dataset_size)")
    strategy: str = opt(
        "auto",
        "greedy (SELECT, the original's), greedy_balanced (greedy with a quota per label), "
        "greedy_batched, topk, topk_balanced, bottomk, p_min, p_max, loss_drop (largest log "
        "p_finetuned(y) / p_base(y) of the autolabel y, or for language modelling the base's mean "
        "next-token loss minus the finetuned one's; ranked without gradients, for one more forward "
        "pass of the base), loss_drop_balanced, random, or auto: the line that measured best where "
        "it applies (README, 'What --strategy auto runs'). For 2-10 labels under the label-token "
        "loss with head gradients, a quota per label on K-FAC-whitened gradients (--precondition "
        "kfac): greedy_balanced for 2 labels, topk_balanced for 3-10; with --grad-blocks, 3-10 "
        "labels and k <= 100, topk_balanced on Adam-preconditioned gradients; with --label-loss full "
        "and 2-10 labels, greedy_balanced on the raw gradients; for language modelling loss_drop "
        "(greedy where --grad-blocks, --pseudo-experts, --grad-at, --rounds or --pool ask for "
        "gradients); greedy otherwise. For two labels of a full finetune no line won everywhere: "
        "run topk_balanced with --precondition kfac and with adam beside it and keep the set whose "
        "student w2d train-eval --finetuned --agreement-corpus finds above chance and of the "
        "largest weight-change cosine",
    )
    labels: str = opt(
        "auto", "labels for selected documents: auto (the finetuned model's prediction) or random"
    )
    label_set: str | None = opt(
        None,
        "label names and tokens: a dataset name (its labels.json, with "
        "--verbalizer), a comma-separated list of verbalizer tokens, or discover (the tokens "
        "`w2d inspect` suggests); default: the finetuned model's saved metadata",
    )
    grad_at: str = opt(
        "finetuned",
        "where each path segment's corpus gradients are taken: finetuned (its end; with one segment, "
        "the finetuned weights, as the original), base (its start) or both. Measured: finetuned leads "
        "on models weights2data finetuned; on models finetuned elsewhere base mostly leads (every LoRA "
        "adapter, not every transformers.Trainer classifier), so run base beside the default there "
        "(counts: benchmarks/RESULTS.md, 'Where the gradients are taken: every measurement')",
    )
    pseudo_experts: int = opt(
        1,
        "P: split the path from the base to the finetuned weights into P segments (pseudo-experts), "
        "each matched against its own weight change with gradients taken on it (see --grad-at); "
        "1 is the original's single step (the original's --select_num_pseudoexperts)",
    )
    path: str = opt(
        "linear",
        "pseudo-expert path: linear (θ0 + (k/P)(θ1 − θ0)) or distill (a walk from θ0 trained to match "
        "the finetuned model's label distribution on the corpus, pulled towards its weights)",
    )
    path_combine: str = opt(
        "sum",
        "how gradients taken at several weights join: sum (one gradient per document, summed over the "
        "points, against the whole weight change; LESS-style) or concat (the cosine of the "
        "concatenated gradients, each point against its segment's change)",
    )
    precondition: str = opt(
        "auto",
        "adam: match D ∘ g to the weight change, D = 1/√v̂ from a rank-one (Adafactor-style) estimate "
        "of the corpus gradients' second moments, as an Adam-trained expert moved; kfac: whiten by the "
        "Kronecker-factored second moment (A^-1/2 e hᵀ B^-1/2); none: the raw gradients (the "
        "original's). Head gradients of the label-token loss; with --grad-blocks each block layer's get "
        "their own Adafactor estimate, fitted on 512 corpus documents (under kfac too); exact. "
        "auto: kfac where --strategy auto "
        "chose a quota per label, else adam there (it measured best for greedy on every dataset tried); "
        "none for language modelling and --label-loss full. Under torchrun the estimates are the whole "
        "corpus's (moments all-reduced across ranks). "
        "--opt GCG|GCGA|ADMM maximise the objective under the same preconditioner",
    )
    rounds: int = opt(
        1,
        "M: select in M rounds of k/M; before each later round the base model is trained on the picks so "
        "far (a student) and the gradients are re-taken there, against student − finetuned (the "
        "original's --max_iterations)",
    )
    student_steps: int = opt(
        -1,
        "optimiser steps of each round's student; -1: as many as the expert took (the original's "
        "--select_steps_per_grad)",
    )
    label_prior: str = opt(
        "uniform",
        "label shares for greedy_balanced / topk_balanced: uniform, predicted (the finetuned "
        "model's mean prediction over the corpus) or comma-separated weights, one per label",
    )
    keep_confident: float = opt(
        1.0,
        "S in (0, 1]: pick only among the share S of each autolabel's documents the finetuned model is "
        "surest of (its probability of that label); 1 keeps every document (the original)",
    )
    pool: float = opt(
        0.0,
        "F ≥ 1: greedy picks only among the F·k documents whose own gradient is most aligned with the "
        "weight change (cos(g_i, Δ); F·quota per label for the balanced strategies), so the sum cannot "
        "be built from documents that each point elsewhere and cancel; F = 1 makes greedy top-k. "
        "0: the whole corpus (the original). The strategies that rank without gradients (p_min, p_max, "
        "loss_drop, random) ignore it, with a warning. Measured with greedy_balanced: F = 1.5-2 helped on AG "
        "News (full, top:2) and fell below random on IMDB (top:2, top:4); see benchmarks/RESULTS.md",
    )
    normalize: str = opt(
        "none",
        "unit: the greedy strategies sum each document's gradient scaled to length 1, so documents the "
        "finetuned model is already sure of (small gradients there) cannot steer the sum and fill the "
        "selection; none: the raw gradients (the original). Top-k and the others rank by cosine, "
        "which this leaves alone",
    )
    projection_dim: int = opt(
        0,
        "0: exact factored gradients (default); D > 0: random JL projection to D "
        "dimensions, for parity with the original",
    )
    projection: str = opt("rademacher", "JL projection matrix: rademacher or normal")
    grad_blocks: int = opt(
        0,
        "also take the gradients of the top N decoder blocks' linear layers (those the finetune "
        "changed; exact target terms, Kronecker-sketched cross terms): 0 = the head only (the "
        "original), -1 = every changed block; costs a backward pass through them per document. With "
        "the default preconditioner -1 lifted greedy on an AG News full finetune (closure 0.40 -> 0.56, "
        "level with top-k balanced on the K-FAC-whitened head alone, 0.59, for 6x the features' time)",
    )
    block_sketch_dim: int = opt(256, "sketch dimension per linear layer for --grad-blocks")
    loss_drop_per: str = opt(
        "token",
        "language modelling's loss drop: each document's mean drop per scored token (token), or its "
        "summed drop, the likelihood ratio log p_finetuned(x) / p_base(x) (document), which weighs a "
        "passage by its length where the mean favours short fragments",
    )
    batch_reset: int = opt(32, "greedy_batched: the running sum restarts every this many picks")
    seed: int = opt(0, "seed for random labels, random selection and projections")

    def __post_init__(self) -> None:
        from weights2data.precondition import PRECONDITIONERS
        from weights2data.selection import STRATEGY_SETTINGS

        _choice("strategy", self.strategy, STRATEGY_SETTINGS)
        _choice("labels", self.labels, ("auto", "random"))
        check_types(self)
        _choice("grad_at", self.grad_at, GRAD_AT)
        _choice("path", self.path, PATHS)
        _choice("path_combine", self.path_combine, ("concat", "sum"))
        _choice("precondition", self.precondition, PRECONDITIONERS)
        _choice("normalize", self.normalize, NORMALIZE)
        _choice("loss_drop_per", self.loss_drop_per, DROP_PER)
        if self.k < 1:
            raise W2DError(f"k must be at least 1 (got {self.k})")
        if self.rounds < 1 or self.rounds > self.k:
            raise W2DError(f"rounds must be between 1 and k = {self.k} (got {self.rounds})")
        if self.student_steps < -1 or self.student_steps == 0:
            raise W2DError(
                f"student_steps must be positive, or -1 for the expert's (got {self.student_steps})"
            )
        if not 0 < self.keep_confident <= 1:
            raise W2DError(f"keep_confident must be in (0, 1] (got {self.keep_confident})")
        if self.pool != 0 and self.pool < 1:
            raise W2DError(f"pool must be 0 (off) or at least 1, a multiple of k (got {self.pool})")
        if self.pseudo_experts < 1:
            raise W2DError(f"pseudo_experts must be at least 1 (got {self.pseudo_experts})")
        if self.label_prior not in ("uniform", "predicted") and not re.fullmatch(
            r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?)*\s*", self.label_prior
        ):
            raise W2DError(
                f"label_prior must be uniform, predicted or weights such as 2,1,1 (got {self.label_prior!r})"
            )
        several = self.pseudo_experts > 1 or self.grad_at == "both"
        if self.path_combine == "sum" and several and (self.grad_blocks or self.projection_dim):
            raise W2DError(
                "--path-combine sum joins head gradients only, unprojected: with --grad-blocks or "
                "--projection-dim use --path-combine concat"
            )
        _choice("projection", self.projection, ("rademacher", "normal"))
        if self.projection_dim < 0:
            raise W2DError("projection_dim must be 0 (exact) or positive")
        if self.grad_blocks < -1:
            raise W2DError(
                f"grad_blocks must be 0 (head only), N > 0 or -1 (all changed blocks), got {self.grad_blocks}"
            )
        if self.block_sketch_dim < 1:
            raise W2DError(f"block_sketch_dim must be positive (got {self.block_sketch_dim})")
        if self.batch_reset < 1:
            raise W2DError(f"batch_reset must be at least 1 (got {self.batch_reset})")


@dataclass
class RunConfig:
    base: str = opt("smollm2-135m", "base model (the original's --model)")
    corpus: str = opt("wiki_passages_10000", "candidate corpus (the original's --select_seed_dataset)")
    strategies: str = opt(
        "auto",
        "comma-separated selection strategies to compare (auto: as --strategy auto in w2d select), "
        "each trained and scored against the random "
        "baseline; NAME@SETTING=VALUE gives one strategy its own select settings, e.g. "
        "greedy,greedy_balanced@precondition=kfac (several: greedy_balanced@precondition=kfac@pool=2)",
    )
    optimizer_test: str | None = opt(None, "optimizer for training on the selections (default: the expert's)")
    skip_similarity: bool = opt(False, "skip the embedding-based dataset similarity metrics")

    def __post_init__(self) -> None:
        from weights2data.selection import STRATEGY_SETTINGS

        check_types(self)
        if not self.strategy_list:
            raise W2DError(f"strategies names no strategy (got {self.strategies!r}): e.g. greedy,topk")
        for strategy, overrides in self.strategy_specs.values():
            _choice("strategy", strategy, STRATEGY_SETTINGS)
            fixed = sorted(set(overrides) & {"k", "strategy"})
            if fixed:
                raise W2DError(f"strategies: {', '.join(fixed)} is shared by every strategy of a run")
        if self.optimizer_test is not None:
            _choice("optimizer_test", self.optimizer_test, OPTIMIZERS)

    @property
    def strategy_list(self) -> list[str]:
        """Each entry as written, settings included: the names of the run's selections."""
        return list(dict.fromkeys(s.strip() for s in self.strategies.split(",") if s.strip()))

    @property
    def strategy_specs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """name -> (strategy, its own select settings): 'greedy_balanced@precondition=kfac' ->
        ('greedy_balanced', {'precondition': 'kfac'})."""
        specs = {}
        for name in self.strategy_list:
            strategy, *settings = name.split("@")
            specs[name] = strategy, select_overrides(" ".join(settings))
        return specs


@dataclass
class GenerateConfig:
    docs: int = opt(
        0,
        "documents to generate from the finetuned model contrasted against the base; select / run "
        "append them to the corpus as candidates (0: none)",
    )
    alpha: float = opt(
        0.5,
        "contrast strength: next-token logits = logit(finetuned) − alpha · logit(base); 0 samples the "
        "finetuned model alone, 1 its likelihood ratio to the base",
    )
    plausibility: float = opt(
        0.1,
        "keep only tokens the finetuned model gives at least this share of its top token's probability "
        "(contrastive decoding's plausibility constraint; 0: off)",
    )
    temperature: float = opt(1.0, "divides the contrasted logits before sampling")
    top_p: float = opt(0.95, "nucleus sampling over the contrasted distribution (1: off)")
    prefixes: str | None = opt(
        None,
        "openings drawn for each document: a comma-separated list or a file with one per line "
        "(default: The, A, In, It, This, I, On, After)",
    )
    seq_len: int | None = opt(
        None, "tokens per document, its opening included (default: the task's sequence length, 32)"
    )
    batch_size: int = opt(32, "documents generated together")
    per_label: bool = opt(
        False,
        "classifiers (select / run): generation conditioned on the label, by rejection: draw round "
        "after round and keep a document only while the finetuned model's label for it has not filled "
        "its equal share of docs (the label token follows the text, so it cannot lead the sampling)",
    )
    max_draws: int = opt(
        0,
        "with per_label: documents drawn at most, then labels short of their share stay short (0: 4 × docs)",
    )
    seed: int = opt(0, "seed for the openings and the sampling")

    def __post_init__(self) -> None:
        check_types(self)
        if self.docs < 0 or self.alpha < 0 or self.batch_size < 1 or self.max_draws < 0:
            raise W2DError("docs, alpha and max_draws must be >= 0, batch size at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or not 0 <= self.plausibility <= 1:
            raise W2DError("temperature must be > 0, top_p in (0, 1], plausibility in [0, 1]")
        if self.seq_len is not None and self.seq_len < 2:
            raise W2DError(f"generated sequence length must be at least 2 (got {self.seq_len})")


DEFENSES = ("none", "noise", "relative-noise", "retrain", "head-obfuscate")
# noise: the original's 0.01; relative-noise: the update's own size; retrain: 100 steps; head-obfuscate:
# moving the head by its own norm is worth 0.1 nats of KL on public text
DEFAULT_STRENGTH = {"noise": 0.01, "relative-noise": 1.0, "retrain": 1.0, "head-obfuscate": 0.1}


@dataclass
class DefenseConfig:
    method: str = opt(
        "none",
        "how the finetuned model is changed before release: noise (θ + S·N(0, 1) on every weight, the "
        "original's), relative-noise (σ = S · rms of the finetune's update, per tensor, on the rows it "
        "changed), retrain (train the weights the finetune changed on public text, kept close to its "
        "outputs by a KL term), head-obfuscate (move the head as far as a KL penalty on public text "
        "allows) or none",
    )
    strength: float | None = opt(
        None,
        "S: noise: the noise's std (default 0.01); relative-noise: σ in units of the update's rms "
        "(default 1); retrain: hundreds of steps (default 1: 100); head-obfuscate: how much KL (nats) "
        "one head norm of movement may cost (default 0.1)",
    )
    steps: int | None = opt(
        None, "optimiser steps: retrain (default: round(S × 100)), head-obfuscate (default 200)"
    )
    kl_weight: float = opt(
        10.0,
        "retrain: λ of next-token loss + λ · KL(finetuned ‖ defended) on the task's output "
        "distribution (a classifier: its label tokens at the last position)",
    )
    seed: int = opt(0, "seed of the noise, the retrain batches and the obfuscation's start")

    def __post_init__(self) -> None:
        check_types(self)
        _choice("defense", self.method, DEFENSES)
        if self.method == "none" and (self.strength is not None or self.steps is not None):
            raise W2DError("a defence's strength or steps were given without a method (--defense METHOD)")
        if self.strength is None and self.method != "none":
            self.strength = DEFAULT_STRENGTH[self.method]
        if (self.strength is not None and self.strength <= 0) or (self.steps is not None and self.steps < 1):
            raise W2DError("the defence's strength must be > 0 and its steps at least 1")
        if self.kl_weight < 0:
            raise W2DError(f"kl_weight must be >= 0 (got {self.kl_weight})")

    @property
    def optimiser_steps(self) -> int:
        """Retrain: S × 100 steps unless --steps; head-obfuscate: 200 unless --steps."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.strength * 100)) if self.method == "retrain" else 200


SYNTH_METHODS = ("SELECT", "GCG", "GCGA", "ADMM")  # the original's --opt values


@dataclass
class SynthConfig:
    method: str = opt(
        "SELECT",
        "SELECT (pick corpus documents only) or a synthesiser that writes documents maximising the same "
        "cos(sum of head gradients, delta), preconditioned as SELECT's (--precondition): GCG (greedy "
        "coordinate gradient token swaps), GCGA (documents grown one at a time against the running sum, "
        "each by a few GCG steps) or ADMM (continuous input embeddings projected onto tokens)",
    )
    init: str = opt(
        "select",
        "where the synthetic documents start: select (the picks of the first --strategies entry: a "
        "refinement) or random (k random corpus passages)",
    )
    steps: int = opt(20, "GCG: token-swap steps; ADMM: outer iterations (z- and dual steps)")
    doc_steps: int = opt(3, "GCGA: GCG steps for each grown document")
    topk: int = opt(
        64,
        "GCG/GCGA: candidate tokens per position, by one-hot gradient, among the fluent tokens "
        "(--synth-fluent-tokens; Zou et al. take 256 of the whole vocabulary)",
    )
    search_width: int = opt(
        128, "GCG/GCGA: B, random single-token swaps evaluated exactly per step (Zou et al.: 512)"
    )
    swap_docs: int = opt(
        16, "GCG: documents whose token gradients are taken in a step (0: all); the swaps fall among them"
    )
    swaps_per_step: int = opt(
        16,
        "GCG: swaps kept per step, on distinct documents, best first, each only if the set's exact "
        "objective rises (1: Zou et al.'s single best swap; up to --synth-swap-docs cost nothing more)",
    )
    fluent_tokens: int = opt(
        256,
        "GCG/GCGA/ADMM: every token written is among the base model's N likeliest next tokens at its "
        "place, given the document's tokens before it (a document's first token is free), so the "
        "text stays readable; 0: any token (Zou et al.'s GCG)",
    )
    rho: float = opt(
        0.001,
        "ADMM: penalty ρ on ‖X − Z + Λ/ρ‖² (the original's --admm_penalty_term, 0.1). The objective's "
        "gradient per embedding entry is ~3e-4 for k = 20 on smollm2-135m and shrinks as 1/k; X strays "
        "from its tokens by about that over ρ",
    )
    lr_tokens: float = opt(
        0.05, "ADMM: Adam learning rate of the input embeddings (entries of smollm2's are about 0.1)"
    )
    inner_steps: int = opt(10, "ADMM: Adam steps per x-step (the original's --max_iterations_x, 40)")
    admm_keep: str = opt(
        "set",
        "ADMM: what each projection may change in the kept documents: set (the whole projected set "
        "replaces them when its objective is higher) or documents (each rewritten document replaces "
        "its predecessor on its own, best first, when that raises the objective)",
    )
    save_every: int = opt(5, "steps (GCGA: documents) between saved states; a killed run resumes there")
    batch_size: int = opt(32, "documents per forward pass")
    seed: int = opt(0, "seed of the swaps and of the random initial passages")

    def __post_init__(self) -> None:
        check_types(self)
        _choice("opt", self.method, SYNTH_METHODS)
        _choice("synth_init", self.init, ("select", "random"))
        _choice("synth_admm_keep", self.admm_keep, ("set", "documents"))
        counts = (self.steps, self.doc_steps, self.topk, self.search_width, self.swaps_per_step)
        counts += (self.inner_steps, self.save_every, self.batch_size)
        if min(counts) < 1 or min(self.swap_docs, self.fluent_tokens) < 0:
            raise W2DError(
                "synthesis steps, doc steps, top-k, search width, swaps per step, inner steps, save interval "
                "and batch size must be at least 1, swap docs and fluent tokens at least 0"
            )
        if self.rho <= 0 or self.lr_tokens <= 0:
            raise W2DError(f"rho and lr_tokens must be > 0 (got {self.rho}, {self.lr_tokens})")

    @property
    def synthesises(self) -> bool:
        return self.method != "SELECT"


# a run directory's config.json holds these sections, each the to_dict of its config
CONFIG_SECTIONS = {
    "data": DataConfig,
    "finetune": FinetuneConfig,
    "eval": EvalConfig,
    "select": SelectConfig,
    "generate": GenerateConfig,
    "defense": DefenseConfig,
    "synth": SynthConfig,
    "run": RunConfig,
}
