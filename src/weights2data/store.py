"""Disk state: the cache directory, content hashes, atomic writes and run directories.

Every file a later run trusts is written to a temporary name and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. What a killed
process does leave is a temporary name (`.NAME.HEX.tmp`): every reader ignores those, and
`remove_stale_temps` deletes them once they are old enough to belong to no live writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from weights2data.errors import W2DError

CACHE_ENV = "W2D_CACHE_DIR"
TEMP_PATTERN = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # _temp_name's names
STALE_TEMP_S = 10 * 60  # every write is the last step of its work, so a live one is far younger


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: the flag, else $W2D_CACHE_DIR, else ~/.cache/weights2data."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "weights2data"
    path = Path(root).expanduser()
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def key_matches(saved: Any, key: dict) -> bool:
    """Whether a key read back from JSON is `key` (JSON turns tuples into lists)."""
    return stable_hash(saved, 64) == stable_hash(key, 64)


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


def is_temp(path: Path) -> bool:
    """A name `_temp_name` made: a write in progress, or one a killed process left behind."""
    return TEMP_PATTERN.fullmatch(path.name) is not None


def remove_stale_temps(root: Path, min_age_s: float = STALE_TEMP_S, dry_run: bool = False) -> list[Path]:
    """Delete the temporary files and folders under `root` last changed over `min_age_s` ago.

    Symbolic links are not followed. Returns what was (with dry_run: would be) deleted.
    """
    stale = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if is_temp(path) and time.time() - path.lstat().st_mtime > min_age_s:
                stale.append(path)
        dirs[:] = [d for d in dirs if not is_temp(Path(d))]
    for path in [] if dry_run else stale:
        remove(path)
    return stale


def remove(path: Path) -> None:
    """Delete a file, a link (not its target) or a folder; a folder vanishes at once, by a rename
    to a temporary name, so a prune killed halfway never leaves a half-deleted entry to be reused."""
    with write_errors(path):
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
        doomed = path if is_temp(path) else _temp_name(path)
        os.replace(path, doomed)
        shutil.rmtree(doomed)


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only folder) into a W2DError that says what to do."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            hint = "the disk is full: free space (see `w2d cache prune --help`) or write elsewhere"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "no permission to write there: pass a writable --cache-dir / --results-dir"
        elif code in (errno.EEXIST, errno.ENOTDIR):
            hint = "a file stands where a folder is needed: choose another folder"
        else:
            hint = str(exc)
        raise W2DError(f"could not write {path}: {hint}") from exc


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp_path = _temp_name(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def touch(path: Path) -> None:
    """Record a cache entry's use in its modification time (what `w2d cache prune --older-than` reads).

    Best effort: an entry that cannot be touched (a read-only cache) is still read.
    """
    with contextlib.suppress(OSError):
        os.utime(path)


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


def with_defaults(config: dict, defaults: dict[str, dict]) -> dict:
    """`config` with each section's missing options at their defaults."""
    return {
        key: defaults[key] | value if isinstance(value, dict) and key in defaults else value
        for key, value in config.items()
    }


@dataclass(frozen=True)
class RunDir:
    """A named output directory: <results_dir>/<exp_name>/ with config, metrics and a log."""

    path: Path

    @classmethod
    def create(
        cls,
        results_dir: str | os.PathLike,
        exp_name: str,
        config: dict,
        ignore: tuple[str, ...] = (),
        defaults: dict[str, dict] | None = None,
    ) -> RunDir:
        """Create the directory and write `config` into it. An unfinished run there (killed before
        its metrics.json) is resumed, and so is a finished one of the same config (but for the keys
        in `ignore`): the same command again. A finished run of another config is kept: its results
        would no longer match it. `defaults` (section -> option -> default) fills the options a run
        saved before they existed: it ran as their defaults do."""
        path = Path(results_dir) / exp_name
        saved = path / "config.json"
        if (path / "metrics.json").exists() and saved.exists():
            old = with_defaults(read_json(saved), defaults or {})
            old = {k: v for k, v in old.items() if k not in ignore}
            if not key_matches(old, {k: v for k, v in config.items() if k not in ignore}):
                raise W2DError(
                    f"{path} holds a finished run of another command or other settings: choose another "
                    "--exp-name, or delete that folder"
                )
        with write_errors(path):
            path.mkdir(parents=True, exist_ok=True)
        write_json(saved, config)
        return cls(path)

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> None:
        write_json(self.path / name, metrics)

    def attach_log(self) -> logging.Handler:
        """Copy the package's log records into <run>/log.txt (the caller removes the handler)."""
        handler = logging.FileHandler(self.path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("weights2data").addHandler(handler)
        return handler
