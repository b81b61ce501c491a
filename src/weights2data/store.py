"""Disk state: the cache directory, content hashes, atomic writes and run directories.

Every file a later run trusts is written to a temporary name and renamed into place, so a
killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "W2D_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: the flag, else $W2D_CACHE_DIR, else ~/.cache/weights2data."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "weights2data"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def hash_texts(texts: list[str], labels: np.ndarray | None = None) -> str:
    """Content fingerprint of a list of texts (and labels): any changed row changes it."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _temp_name(path: Path) -> Path:
    """A fresh name beside `path`. Created by the caller with the user's umask, as a plain `open`
    would: mkstemp / mkdtemp would leave results and checkpoints private (0600 / 0700)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_name(path)
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON, written atomically: NaN and infinities (undefined figures) become null."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, np.floating):
        return _finite(float(obj))
    return obj


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass(frozen=True)
class RunDir:
    """A named output directory: <results_dir>/<exp_name>/ with config, metrics and a log."""

    path: Path

    @classmethod
    def create(cls, results_dir: str | os.PathLike, exp_name: str) -> RunDir:
        path = Path(results_dir) / exp_name
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config)

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> None:
        write_json(self.path / name, metrics)

    def attach_log(self) -> logging.Handler:
        """Copy the package's log records into <run>/log.txt (the caller removes the handler)."""
        handler = logging.FileHandler(self.path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("weights2data").addHandler(handler)
        return handler
