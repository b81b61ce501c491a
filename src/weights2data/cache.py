"""What the cache holds and freeing its space: the library side of `w2d cache ls` and `w2d cache prune`.

One folder per kind of entry under the cache root (store.cache_dir); an entry is one child of
it. Every entry but a model is keyed by what it was computed from and by the versions of
weights2data and torch and the device kind that computed it (features.cache_key), so an entry
written by another version or on another kind of device is never reused, only listed and pruned.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from weights2data.errors import W2DError
from weights2data.store import read_json, remove, remove_stale_temps

KINDS = {  # kind → its folders under the cache root
    "models": ("models", "hub"),
    "finetuned": ("finetuned",),
    "defended": ("defended",),
    "hidden": ("hidden",),
    "lm-features": ("lm-features",),
    "blocks": ("blocks",),
    "train-eval": ("train-eval",),
    "generated": ("generated",),
    "rounds": ("rounds",),
    "synthesis": ("synthesis",),
}
# pruned only when named: the converted smollm2-135m and hub downloads cannot be rebuilt offline
PROTECTED = ("models",)
KEY_FIELDS = {  # the readable parts of each chunked kind's key
    "hidden": ("rows", "layer", "last_only", "dtype"),
    "lm-features": ("rows", "settings", "dtype"),
    "blocks": ("rows", "start", "settings", "loss"),
}


@dataclass
class Entry:
    kind: str
    path: Path
    size: int  # bytes, links not followed
    last_use: float  # Unix time: the newest modification (readers touch what they reuse)
    summary: str


def entries(root: Path, kinds: Sequence[str] = tuple(KINDS)) -> list[Entry]:
    """The entries of `kinds` under the cache root, by kind then name."""
    out = []
    for kind in kinds:
        for folder in KINDS[kind]:
            parent = root / folder
            children = sorted(parent.iterdir()) if parent.is_dir() else []
            for path in children:
                if path.name.startswith("."):  # temporary names, the hub's locks
                    continue
                size, last_use = disk_usage(path)
                out.append(Entry(kind, path, size, last_use, describe(kind, path)))
    return out


def disk_usage(path: Path) -> tuple[int, float]:
    """Bytes of the files under `path` and their newest modification time; links are not followed."""
    top = path.lstat()
    if path.is_symlink() or not path.is_dir():
        return top.st_size, top.st_mtime
    files = [(Path(folder) / name).lstat() for folder, _dirs, names in os.walk(path) for name in names]
    return sum(s.st_size for s in files), max([top.st_mtime, *(s.st_mtime for s in files)])


def prune(
    root: Path, kinds: Sequence[str] | None, older_than_days: float | None, every: bool, dry_run: bool
) -> tuple[list[Entry], list[Path]]:
    """Delete the entries of `kinds` (default: all but the protected ones) last used over
    `older_than_days` ago, or all of them (`every`), and stale temporary files left by killed runs.

    Returns the entries and temporary files deleted (with dry_run: that would be deleted).
    """
    if older_than_days is not None and not older_than_days >= 0:
        raise W2DError(f"--older-than takes a number of days >= 0 (got {older_than_days})")
    chosen = entries(root, kinds or [k for k in KINDS if k not in PROTECTED])
    if every:
        doomed = chosen
    elif older_than_days is not None:
        cutoff = time.time() - older_than_days * 86400
        doomed = [e for e in chosen if e.last_use < cutoff]
    else:
        doomed = []
    temps = remove_stale_temps(root, dry_run=dry_run)
    for entry in [] if dry_run else doomed:
        remove(entry.path)
    return doomed, temps


# ---------------------------------------------------------------- one line per entry


def describe(kind: str, path: Path) -> str:
    """A short summary of an entry's key: what it was computed from, by which version, on which device."""
    try:
        if kind == "models":
            return describe_model(path)
        if kind == "finetuned":
            return describe_finetuned(read_json(path / "w2d.json"))
        if kind == "defended":
            return describe_defended(read_json(path / "w2d.json"))
        if kind == "train-eval":
            return describe_scores(read_json(path))
        if kind in ("generated", "rounds", "synthesis"):
            return describe_progress(kind, path)
        return describe_chunks(kind, path, read_json(path / "meta.json"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable, or from an older weights2data: never reused"


def describe_model(path: Path) -> str:
    if path.is_symlink():  # listed and pruned as the link: its size is the link's
        return f"a link to {os.readlink(path)}"
    if path.parent.name == "hub":
        return "downloaded from the Hugging Face hub"
    if (path / "config.json").exists():
        config = read_json(path / "config.json")
        layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
        return f"{config.get('model_type')}, {layers} layers, hidden size {hidden}"
    return "tokenizer" if (path / "tokenizer.json").exists() else ""


def describe_finetuned(meta: dict) -> str:
    task, scope = meta["task"]["kind"], meta["finetune"]["train_scope"]
    return f"{meta['base']} on {meta['dataset']} ({task}, {scope}); {versions(meta.get('key'))}"


def describe_defended(meta: dict) -> str:
    record = meta["defense"]
    return f"{record['method']} {record['strength']:g} of {record['finetuned']}; {versions(meta.get('key'))}"


def describe_scores(saved: dict) -> str:
    if "key" not in saved:
        return versions(None)
    scores = saved["scores"]
    honest = f"{scores['metric']} {scores['val_selected_test']:.4f} (honest)"
    return f"{honest}, {scores['train_rows']} training rows; {versions(saved['key'])}"


def describe_progress(kind: str, path: Path) -> str:
    """Generated documents, a selection's finished rounds or a synthesiser's saved state."""
    if kind == "rounds":
        return f"{len(list(path.glob('round_*.json')))} finished rounds"
    return "generated documents" if kind == "generated" else "a synthesiser's saved state"


def describe_chunks(kind: str, path: Path, key: dict) -> str:
    shown = {**key, "layer": "final" if key.get("layer") is None else key["layer"]}
    fields = ", ".join(f"{name} {shown[name]}" for name in KEY_FIELDS[kind] if name in key)
    done = len(list(path.glob("chunk_*.safetensors")))
    total = math.ceil(key["rows"] / key["chunk_rows"]) if "chunk_rows" in key else "?"
    return f"{fields}; {done}/{total} chunks; {versions(key)}"


def versions(key: dict | None) -> str:
    if not key or "weights2data" not in key:
        return "no version in its key: from an older weights2data, never reused"
    return f"weights2data {key['weights2data']}, torch {key['torch']}, {key['device']}"


def format_listing(root: Path, listed: list[Entry], temps: list[Path]) -> str:
    """`w2d cache ls`: a line per kind, then a line per entry, then stale temporary files."""
    total = sum(e.size for e in listed)
    lines = [f"cache {root}: {human_size(total)} in {len(listed)} entries", ""]
    lines.append(f"{'kind':<12} {'entries':>7} {'size':>10}  last use")
    for kind in dict.fromkeys(e.kind for e in listed):
        group = [e for e in listed if e.kind == kind]
        size, last = sum(e.size for e in group), max(e.last_use for e in group)
        lines.append(f"{kind:<12} {len(group):>7} {human_size(size):>10}  {when(last)}")
    lines.append("")
    for e in listed:
        name = f"{e.path.parent.name}/{e.path.name}"
        lines.append(f"{name:<40} {human_size(e.size):>10}  {when(e.last_use)}  {e.summary}")
    if temps:
        size = sum(disk_usage(p)[0] for p in temps)
        lines.append(
            f"\n{len(temps)} temporary files left by killed runs ({human_size(size)}): "
            "`w2d cache prune` removes them"
        )
    return "\n".join(lines)


def format_pruned(doomed: list[Entry], temps: list[Path], dry_run: bool) -> str:
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} {e.path}  {human_size(e.size)}  last used {when(e.last_use)}" for e in doomed]
    lines += [f"{verb} {path} (left by a killed run)" for path in temps]
    freed = sum(e.size for e in doomed)
    lines.append(f"{verb} {len(doomed)} entries ({human_size(freed)}) and {len(temps)} temporary files")
    return "\n".join(lines)


def human_size(size: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    return f"{size:.0f} B" if units[0] == "B" else f"{size:.1f} {units[0]}"


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")
