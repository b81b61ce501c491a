"""Datasets: name resolution, splits, label sets (verbalizers) and tokenisation.

A dataset argument is one or more space-separated parts, concatenated. Each part is a
local file or directory, or a name resolved first in the data directory
(`<dir>/<name>/{train,validation,test}.parquet` + `labels.json`), then on the hub.
`<name>_<N>` keeps the first N training rows after a seeded shuffle; the test split stays whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from weights2data.errors import W2DError
from weights2data.store import hash_texts, read_json

if TYPE_CHECKING:
    from weights2data.templates import Template

log = logging.getLogger(__name__)

DATA_DIR_ENV = "W2D_DATA_DIR"
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class HubSource:
    """Where the original code's dataset names live on the Hugging Face hub."""

    repo: str
    text: str = "text"
    label: str | None = "label"
    config: str | None = None


SEED_DATASETS = {
    "ag_news": HubSource("fancyzhx/ag_news"),
    "dbpedia": HubSource("fancyzhx/dbpedia_14", text="content"),
    "rotten_tomatoes": HubSource("cornell-movie-review-data/rotten_tomatoes"),
    "imdb": HubSource("stanfordnlp/imdb"),
    "newsgroup": HubSource("SetFit/20_newsgroups"),
    "nq": HubSource("jxm/nq_corpus_dpr", label=None),
    "msmarco": HubSource("Tevatron/msmarco-passage-corpus", label=None),
}


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray | None  # (n,) int64 in 0..C-1, or None for unlabelled text

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> Split:
        labels = None if self.labels is None else self.labels[index]
        return Split([self.texts[i] for i in index], labels)

    @cached_property
    def fingerprint(self) -> str:
        return hash_texts(self.texts, self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split | None = None
    validation: Split | None = None
    label_names: list[str] | None = None  # index i names label i

    @property
    def has_labels(self) -> bool:
        return self.label_names is not None and self.train.labels is not None

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])

    @cached_property
    def fingerprint(self) -> str:
        parts = [s.fingerprint if s is not None else "-" for s in (self.train, self.validation, self.test)]
        return hash_texts(parts + [repr(self.label_names)])


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    root = override or os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() if root else None


def load_dataset(
    spec: str,
    *,
    data_dir: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    seed: int = 0,
) -> Dataset:
    """Resolve a dataset argument (see module docstring) into train/validation/test splits."""
    parts = str(spec).split()
    if not parts:
        raise W2DError("empty dataset name")
    root = None if data_dir is None else Path(data_dir).expanduser()
    loaded = [_load_part(p, root, text_column, label_column, seed) for p in parts]
    return loaded[0] if len(loaded) == 1 else concatenate(loaded)


def _load_part(
    part: str, root: Path | None, text_column: str, label_column: str | None, seed: int
) -> Dataset:
    path = Path(part).expanduser()
    if path.exists():
        return _load_local(path, text_column, label_column)
    if root is not None and not root.is_dir():
        raise W2DError(f"the data directory {root} (--data-dir or ${DATA_DIR_ENV}) is not a folder")
    base, n = (part, None) if root is not None and (root / part).is_dir() else split_size_suffix(part)
    if root is not None and (root / base).is_dir():
        dataset = _load_local(root / base, text_column, label_column, name=base)
    elif base in SEED_DATASETS:
        dataset = _load_hub(base, root)
    elif path.suffix in FILE_SUFFIXES or "/" in part:
        raise W2DError(f"dataset file not found: {part}")
    else:
        known = sorted(set(SEED_DATASETS) | _data_dir_names(root))
        raise W2DError(
            f"unknown dataset '{part}': not a file or directory, and not one of {', '.join(known)} "
            f"(optionally with _N, e.g. ag_news_1000). "
            f"Data directory: {root or f'unset (set ${DATA_DIR_ENV})'}"
        )
    return dataset if n is None else take_first(dataset, n, seed, name=part)


def split_size_suffix(name: str) -> tuple[str, int | None]:
    """'ag_news_1000' -> ('ag_news', 1000); 'ag_news' -> ('ag_news', None); 'ag_news_-5' -> ('ag_news', -5),
    which take_first refuses."""
    match = re.fullmatch(r"(.+?)_(-?\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def _data_dir_names(root: Path | None) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()} if root and root.is_dir() else set()


def take_first(dataset: Dataset, n: int, seed: int, name: str) -> Dataset:
    """The first n training rows after a seeded shuffle; other splits unchanged."""
    if n < 1:
        raise W2DError(f"{name}: the number of rows must be at least 1")
    if n > len(dataset.train):
        raise W2DError(
            f"{name}: asked for {n} rows but {dataset.name} has {len(dataset.train)} training rows"
        )
    order = np.random.default_rng(seed).permutation(len(dataset.train))[:n]
    return Dataset(name, dataset.train.subset(order), dataset.test, dataset.validation, dataset.label_names)


def _load_local(path: Path, text_column: str, label_column: str | None, name: str | None = None) -> Dataset:
    """A data-directory folder, a folder of split files, or one file (all rows are 'train')."""
    name = name or path.stem
    if path.is_file():
        table = _read_table(path)
        label_names = _label_names(path.parent / "labels.json")
        return _make_dataset(name, {"train": table}, text_column, label_column, label_names, path)
    tables = {}
    for split in SPLITS:
        files = [
            path / f"{split}{suffix}" for suffix in FILE_SUFFIXES if (path / f"{split}{suffix}").exists()
        ]
        if files:
            tables[split] = _read_table(files[0])
    if "train" not in tables:
        raise W2DError(f"{path}: no train split (expected train.parquet, .csv, .jsonl or .json)")
    return _make_dataset(name, tables, text_column, label_column, _label_names(path / "labels.json"), path)


def _read_table(path: Path) -> pa.Table:
    readers = {".parquet": pq.read_table, ".csv": pa_csv.read_csv, ".jsonl": pa_json.read_json}
    reader = readers.get(path.suffix, pa_json.read_json if path.suffix == ".json" else None)
    if reader is None:
        raise W2DError(f"{path}: unsupported file type (use parquet, csv or jsonl)")
    try:
        return reader(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise W2DError(f"{path}: could not read the file: {exc}") from exc


def _label_names(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        names = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise W2DError(f"{path}: could not read the label names: {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise W2DError(f"{path}: expected a JSON list of label names")
    return names


def _make_dataset(
    name: str,
    tables: dict[str, pa.Table],
    text_column: str,
    label_column: str | None,
    label_names: list[str] | None,
    source: Path,
) -> Dataset:
    """`label_column` None reads the column `label` when there is one; a named column must exist."""
    train = tables["train"]
    columns = ", ".join(train.column_names)
    if text_column not in train.column_names:
        raise W2DError(
            f"{source}: no text column '{text_column}' (columns: {columns}); choose one with --text-column"
        )
    if label_column is not None and label_column not in train.column_names:
        raise W2DError(
            f"{source}: no label column '{label_column}' (columns: {columns}); choose one with "
            "--label-column, or leave it unset to read the column 'label' when there is one"
        )
    label_column = label_column or "label"
    labelled = label_column in train.column_names
    if labelled:
        values = _label_values(train.column(label_column).to_pylist(), f"{source}:train")
        label_names = label_names or _infer_label_names(values)
    splits = {
        split: _make_split(
            table, text_column, label_column if labelled else None, label_names, f"{source}:{split}"
        )
        for split, table in tables.items()
    }
    if len(splits["train"]) == 0:
        raise W2DError(f"{source}: the training split is empty")
    return Dataset(
        name, splits["train"], splits.get("test"), splits.get("validation"), label_names if labelled else None
    )


def _infer_label_names(values: list[str] | np.ndarray) -> list[str]:
    """Integer ids 0..max name themselves; names are sorted."""
    if isinstance(values, np.ndarray):
        return [str(i) for i in range(int(values.max(initial=0)) + 1)]
    return sorted(set(values))


def _make_split(
    table: pa.Table, text_column: str, label_column: str | None, label_names: list[str] | None, where: str
) -> Split:
    if text_column not in table.column_names:
        raise W2DError(f"{where}: no text column '{text_column}'")
    values = table.column(text_column).to_pylist()
    other = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if other is not None:
        raise W2DError(
            f"{where}: the text column '{text_column}' holds {type(other).__name__} values "
            f"such as {other!r}, not text; choose the text column with --text-column"
        )
    texts = [t or "" for t in values]
    labels = None
    if label_column is not None:
        if label_column not in table.column_names:
            raise W2DError(f"{where}: no label column '{label_column}'")
        labels = _label_ids(table.column(label_column).to_pylist(), label_names or [], where)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < len(texts):
        log.info("%s: dropped %d rows with empty text", where, len(texts) - len(keep))
        texts = [texts[i] for i in keep]
        labels = None if labels is None else labels[keep]
    return Split(texts, labels)


def _label_values(values: list, where: str) -> list[str] | np.ndarray:
    """A label column as names (strings) or integer ids; a float column of whole numbers (how
    pandas stores integers with gaps) holds ids, and NaN is a missing value."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        raise W2DError(f"{where}: the label column has missing values")
    if all(isinstance(v, str) for v in values):
        return values
    bad = next((v for v in values if not isinstance(v, int | float) or not float(v).is_integer()), None)
    if bad is not None:
        raise W2DError(f"{where}: labels must be integer ids or names (strings), not {bad!r}")
    return np.asarray(values, dtype=np.int64)


def _label_ids(values: list, label_names: list[str], where: str) -> np.ndarray:
    found = _label_values(values, where)
    if isinstance(found, list):
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({v for v in found if v not in index})
        if unknown:
            raise W2DError(f"{where}: labels {unknown[:5]} are not in the label set {label_names}")
        return np.array([index[v] for v in found], dtype=np.int64)
    outside = sorted({int(v) for v in found if not 0 <= v < len(label_names)})
    if outside:
        raise W2DError(
            f"{where}: label ids must lie in 0..{len(label_names) - 1} (labels: {label_names}); "
            f"found {outside[:5]}"
        )
    return found


def _load_hub(name: str, root: Path | None) -> Dataset:
    from weights2data.models import hub_reachable

    source = SEED_DATASETS[name]
    if not hub_reachable():
        raise W2DError(
            f"dataset '{name}' is not in the data directory "
            f"({root or f'unset: set ${DATA_DIR_ENV}'}) and the "
            f"Hugging Face hub is unreachable (would fetch {source.repo}). Put it in <data_dir>/{name}/ as "
            "train.parquet / test.parquet (+ labels.json), or pass a local file."
        )
    try:
        import datasets
    except ImportError as exc:
        raise W2DError("loading from the hub needs the `datasets` package: pip install datasets") from exc
    hub = datasets.load_dataset(source.repo, source.config)
    label_names = None
    if source.label and source.label in hub["train"].features:
        label_names = list(getattr(hub["train"].features[source.label], "names", []) or []) or None
    tables = {split: hub[split].data.table for split in SPLITS if split in hub}
    return _make_dataset(name, tables, source.text, source.label, label_names, Path(source.repo))


def concatenate(parts: list[Dataset]) -> Dataset:
    """Stack datasets; labels survive only when every part has the same label set."""
    names = {tuple(p.label_names) if p.has_labels else None for p in parts}
    label_names = list(next(iter(names))) if len(names) == 1 and None not in names else None

    def stack(splits: list[Split | None]) -> Split | None:
        present = [s for s in splits if s is not None]
        if not present:
            return None
        labels = np.concatenate([s.labels for s in present]) if label_names else None
        return Split([t for s in present for t in s.texts], labels)

    return Dataset(
        " ".join(p.name for p in parts),
        stack([p.train for p in parts]),
        stack([p.test for p in parts]),
        stack([p.validation for p in parts]),
        label_names,
    )


# ---------------------------------------------------------------- label sets and tokenisation


@dataclass(frozen=True)
class LabelSet:
    """The verbalizer: label i is predicted as the single token `token_ids[i]`."""

    names: list[str]
    tokens: list[str]  # e.g. [" A", " B", ...], with their leading space
    token_ids: list[int]

    def to_dict(self) -> dict:
        return {"names": self.names, "tokens": self.tokens, "token_ids": self.token_ids}

    @classmethod
    def from_dict(cls, d: dict) -> LabelSet:
        return cls(list(d["names"]), list(d["tokens"]), [int(t) for t in d["token_ids"]])


def make_label_set(
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    verbalizer: str = "letters",
    template: Template | None = None,
) -> LabelSet:
    """Build the verbalizer: `letters` (A, B, C, ... as the original), `names`, or 'w1,w2,...'.

    Each word becomes the token that follows the template's prompt (after a space, unless the
    prompt ends in whitespace, as a chat template's assistant turn does).
    """
    from weights2data.templates import PLAIN, label_token_ids

    template = template or PLAIN
    if verbalizer == "letters":
        if len(label_names) > 26:
            raise W2DError(
                f"{len(label_names)} labels do not fit the letters A-Z; use --verbalizer names or a list"
            )
        words = [chr(ord("A") + i) for i in range(len(label_names))]
    elif verbalizer == "names":
        words = list(label_names)
    else:
        words = [w.strip() for w in verbalizer.split(",")]
        if not all(words):
            raise W2DError(f"the verbalizer list '{verbalizer}' has an empty entry")
        if len(words) == 1 < len(label_names):
            raise W2DError(
                f"unknown verbalizer '{verbalizer}': use letters, names or a comma-separated list of "
                f"{len(label_names)} tokens"
            )
        if len(words) != len(label_names):
            raise W2DError(
                f"the verbalizer lists {len(words)} tokens but the dataset has {len(label_names)} labels"
            )
    tokens = [template.label_lead + w.lstrip() for w in words]
    ids = label_token_ids(template, tokenizer, tokens)
    bad = [
        f"{name!r} -> {tok!r} is {len(i)} tokens {tokenizer.convert_ids_to_tokens(i)}"
        for name, tok, i in zip(label_names, tokens, ids, strict=True)
        if len(i) != 1
    ]
    if bad:
        raise W2DError(
            "every label word must be a single token of the model's tokenizer, the one token the "
            "classifier predicts; these are not: " + "; ".join(bad) + ". Pass single-token words with "
            "--verbalizer w1,w2,... (e.g. the first token of each, if that is what the model was "
            "trained to predict), or --label-set discover to find the tokens the finetune moved"
        )
    flat = [i[0] for i in ids]
    if len(set(flat)) != len(flat):
        raise W2DError(f"two labels share a verbalizer token: {tokens}")
    return LabelSet(list(label_names), tokens, flat)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a text's positions do not depend on its padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Encoded:
    """Token ids ready for the model. Classification: the context before the label token."""

    input_ids: torch.Tensor  # (n, T) long
    attention_mask: torch.Tensor  # (n, T) long, 0 on padding
    target_mask: torch.Tensor | None = None  # (n, T) bool: LM tokens the loss predicts; None: all

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def subset(self, index: torch.Tensor | np.ndarray | slice) -> Encoded:
        target = None if self.target_mask is None else self.target_mask[index]
        return Encoded(self.input_ids[index], self.attention_mask[index], target)


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise W2DError(f"sequence length must be at least 2 (got {seq_len})")


def encode_classification(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> Encoded:
    """Left-truncate and left-pad each text to seq_len - 1 tokens; the label token comes last.

    The example `text + " " + label` has seq_len tokens; the model reads the first
    seq_len - 1 and its prediction at the last position is scored against the label token.
    """
    check_seq_len(seq_len)
    width = seq_len - 1
    rows = [ids[-width:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return _pad(rows, width, tokenizer.pad_token_id, left=True)


def encode_lm(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> Encoded:
    """The first seq_len tokens of each text, right-padded: next-token prediction targets."""
    check_seq_len(seq_len)
    rows = [ids[:seq_len] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return _pad(rows, seq_len, tokenizer.pad_token_id, left=False)


def _pad(rows: list[list[int]], width: int, pad_id: int, left: bool) -> Encoded:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return Encoded(ids, mask)


def scored_positions(
    attention_mask: torch.Tensor, mode: str, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) bool: position t is scored when its target token t+1 exists (right-padded rows)
    and, with a `target_mask` (a template's completion), is one the loss predicts.

    `full` scores every such position; `last` only the last one of each row (the original's).
    """
    if mode not in ("full", "last"):
        raise W2DError(f"unknown lm_loss '{mode}': choose from full, last")
    mask = attention_mask.bool()
    if target_mask is not None:
        mask = mask & target_mask.to(mask.device)
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, 1:]
    if mode == "last":
        # the last scored position of each row: its target is the row's last token
        last = torch.zeros_like(mask)
        rows = torch.nonzero(scored.any(1)).squeeze(1)
        cols = scored.shape[1] - 1 - scored[rows].flip(1).int().argmax(1)
        last[rows, cols] = True
        scored = last
    return scored
