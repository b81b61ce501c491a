"""Hidden-state extraction with a resumable on-disk cache.

Everything downstream of the frozen part of a model (the trained head or top blocks, the
per-example head gradients) is a cheap function of hidden states, so the model's forward
pass runs once per document and its outputs are stored in chunks keyed by the body
weights, the token ids and the layer (and, like every cache entry, by the versions and the
device kind that computed them). A killed run keeps its finished chunks, and a set of
documents that were already run in another set (a selection from a cached corpus, a
concatenation of cached corpora) reads their rows instead of running the model again.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask

from weights2data import __version__
from weights2data.data import Encoded
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, decoder_layers
from weights2data.store import atomic_path, is_temp, key_matches, read_json, stable_hash, touch, write_json

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows per chunk file: at most this much work is lost when a run is killed


def cache_key(device: torch.device | str, **parts: Any) -> dict:
    """The key of a cache entry: what it was computed from (`parts`) and what computed it.

    Numerics differ between devices and between versions of weights2data and torch, so an
    entry is reused only by the same versions on the same kind of device (cpu, cuda, mps).
    """
    return {
        "weights2data": __version__,
        "torch": torch.__version__,
        "device": torch.device(device).type,
        **parts,
    }


class ChunkCache:
    """A resumable cache entry: `<root>/<kind>/<hash of key>/` holds meta.json (the key, checked on
    reload) and one safetensors file per chunk of CHUNK_ROWS rows, each written atomically once done.

    A killed run keeps its finished chunks; the next run with the same key reads them back and
    computes only the rest. The chunk size is part of the key, so chunks never overlap.
    """

    def __init__(self, root: Path, kind: str, key: dict) -> None:
        self.key = {**key, "chunk_rows": CHUNK_ROWS}
        self.folder = Path(root) / kind / stable_hash(self.key, 20)
        meta = self.folder / "meta.json"
        if not meta.exists():
            write_json(meta, self.key)
        elif not key_matches(read_json(meta), self.key):
            raise W2DError(f"{kind} cache {self.folder} does not match its key; delete the folder")
        else:
            touch(meta)

    def path(self, rows: range) -> Path:
        return self.folder / f"chunk_{rows.start:09d}.safetensors"

    def save(self, rows: range, tensors: dict[str, torch.Tensor]) -> None:
        _write_tensors(self.path(rows), tensors)

    def beside(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A result the chunks were computed with (e.g. statistics fitted before them), stored once
        beside them under `name`: read back, or computed and written."""
        path = self.folder / f"{name}.safetensors"
        if path.exists():
            return load_file(str(path))
        tensors = compute()
        _write_tensors(path, tensors)
        return tensors


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    blob = save({name: value.contiguous() for name, value in tensors.items()})
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)  # a Python write: a full disk raises OSError, not a bare SafetensorError


def chunk_ranges(n_rows: int) -> list[range]:
    return [range(start, min(start + CHUNK_ROWS, n_rows)) for start in range(0, n_rows, CHUNK_ROWS)]


def cached_chunk(
    cache: ChunkCache | None, rows: range, compute: Callable[[range], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The tensors of chunk `rows`: read back when a run finished it, else computed and written."""
    if cache is not None and cache.path(rows).exists():
        return load_file(str(cache.path(rows)))
    tensors = compute(rows)
    if cache is not None:
        cache.save(rows, tensors)
    return tensors


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer input is captured."""


@torch.no_grad()
def forward_hidden(model: torch.nn.Module, batch: Encoded, layer: int | None = None) -> torch.Tensor:
    """Hidden states (B, T, d): the final normed output, or the input of block `layer`."""
    device = next(model.parameters()).device
    kwargs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "position_ids": batch.position_ids.to(device),
    }
    if layer is None:
        return model.base_model(**kwargs).last_hidden_state
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple, kw: dict) -> None:
        captured.append(args[0] if args else kw["hidden_states"])
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base_model(**kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def encoded_fingerprint(encoded: Encoded) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(encoded.input_ids.numpy().tobytes())
    h.update(encoded.attention_mask.numpy().tobytes())
    if encoded.target_mask is not None:  # a template's completion: what an LM loss scores
        h.update(encoded.target_mask.numpy().tobytes())
    return h.hexdigest()


def row_fingerprints(encoded: Encoded) -> np.ndarray:
    """(N, 12) uint8: one digest per row of token ids and attention mask."""
    rows = np.concatenate([encoded.input_ids.numpy(), encoded.attention_mask.numpy()], axis=1)
    digests = [hashlib.blake2b(row.tobytes(), digest_size=12).digest() for row in rows]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(rows), 12)


class CachedRows:
    """Where each cached row of one (weights, layer, last_only, dtype, versions, device) family lives."""

    def __init__(self, places: dict[bytes, tuple[Path, int]]) -> None:
        self.places = places  # row digest → (chunk file, row in it)

    @classmethod
    def scan(cls, hidden_root: Path, family: dict, skip: Path) -> CachedRows:
        places: dict[bytes, tuple[Path, int]] = {}
        for meta_path in sorted(hidden_root.glob("*/meta.json")):
            folder = meta_path.parent
            rows_path = folder / "rows.npy"
            if folder == skip or is_temp(folder) or not rows_path.exists():
                continue
            meta = read_json(meta_path)
            if any(meta.get(name) != value for name, value in family.items()):
                continue
            digests = np.load(rows_path)
            for chunk in sorted(folder.glob("chunk_*.safetensors")):
                start = int(chunk.stem.split("_")[1])
                with safe_open(str(chunk), "pt") as f:
                    count = f.get_slice("hidden").get_shape()[0]
                for offset in range(count):
                    places.setdefault(digests[start + offset].tobytes(), (chunk, offset))
        return cls(places)

    def gather(self, digests: np.ndarray) -> tuple[dict[int, torch.Tensor], list[int]]:
        """The rows found (position in `digests` → tensor) and the positions not cached."""
        by_chunk: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        missing = []
        for position, digest in enumerate(digests):
            place = self.places.get(digest.tobytes())
            if place is None:
                missing.append(position)
            else:
                by_chunk[place[0]].append((position, place[1]))
        found = {}
        for chunk, pairs in by_chunk.items():
            with safe_open(str(chunk), "pt") as f:
                rows = f.get_slice("hidden")  # read row by row: a top:N chunk holds (rows, T, d)
                found.update({position: rows[offset : offset + 1][0] for position, offset in pairs})
        return found, missing


class HiddenStates:
    """The hidden states of one encoded set, one chunk of rows at a time.

    `layer=None` is the final normed hidden state (what the LM head reads); an integer is the
    input of that block (what a top:N finetune reads); `last_only` keeps the last position:
    (rows, d), else (rows, T, d). With a cache root, a chunk is read back when a run finished
    it, else gathered from other cached sets holding the same rows and computed for the rest,
    then written atomically, so a killed run resumes.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        encoded: Encoded,
        *,
        layer: int | None = None,
        last_only: bool = False,
        cache_root: Path | None = None,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
        desc: str = "hidden states",
    ) -> None:
        self.loaded, self.encoded, self.layer, self.last_only = loaded, encoded, layer, last_only
        self.batch_size, self.dtype, self.desc = batch_size, dtype, desc
        self.cache = None if cache_root is None else self._open(Path(cache_root))
        self.shared: CachedRows | None = None  # other sets' rows, scanned once a chunk is missing

    def _open(self, cache_root: Path) -> ChunkCache:
        loaded, layer = self.loaded, self.layer
        key = cache_key(
            next(loaded.model.parameters()).device,
            weights=loaded.body_fingerprint if layer is None else loaded.prefix_fingerprint(layer),
            inputs=encoded_fingerprint(self.encoded),
            layer=self.layer,
            last_only=self.last_only,
            dtype=str(self.dtype),
            rows=len(self.encoded),
        )
        cache = ChunkCache(cache_root, "hidden", key)
        if not (cache.folder / "rows.npy").exists():
            with atomic_path(cache.folder / "rows.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, row_fingerprints(self.encoded))
        return cache

    def chunk(self, rows: range) -> torch.Tensor:
        return cached_chunk(self.cache, rows, self._compute)["hidden"]

    def sample(self, rows: range, picks: torch.Tensor) -> torch.Tensor:
        """Rows `picks` (positions in chunk `rows`) of the chunk: read back when a run finished it,
        else computed for those rows alone and not cached (a sample need not pay for whole chunks)."""
        if self.cache is not None and self.cache.path(rows).exists():
            return self.chunk(rows)[picks]
        return torch.cat(list(self._forward((picks + rows.start).tolist())))

    def _compute(self, rows: range) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return {"hidden": torch.cat(list(self._forward(rows)))}
        if self.shared is None:
            family = {k: v for k, v in self.cache.key.items() if k not in ("inputs", "rows", "chunk_rows")}
            self.shared = CachedRows.scan(self.cache.folder.parent, family, skip=self.cache.folder)
        digests = np.load(self.cache.folder / "rows.npy", mmap_mode="r")[rows.start : rows.stop]
        found, missing = self.shared.gather(digests)
        if missing:
            computed = torch.cat(list(self._forward([rows[i] for i in missing])))
            found.update(zip(missing, computed.unbind(), strict=True))
        return {"hidden": torch.stack([found[i] for i in range(len(rows))])}

    def _forward(self, rows: Sequence[int]) -> Iterator[torch.Tensor]:
        options = (self.layer, self.last_only, self.batch_size, self.dtype)
        return _compute_chunks(self.loaded, self.encoded, *options, rows, self.desc)


def hidden_states(loaded: LoadedModel, encoded: Encoded, **options: Any) -> torch.Tensor:
    """All of `hidden_chunks` (same keyword options) in one tensor: (N, d) at the last
    position when last_only, else (N, T, d); cached when cache_root is set.
    """
    chunks = list(hidden_chunks(loaded, encoded, **options))
    return torch.cat(chunks) if chunks else torch.empty(0)


def hidden_chunks(loaded: LoadedModel, encoded: Encoded, **options: Any) -> Iterator[torch.Tensor]:
    """The hidden states of `encoded` in order, a chunk of up to CHUNK_ROWS rows at a time
    (keyword options: those of HiddenStates); at most one chunk is held in memory."""
    source = HiddenStates(loaded, encoded, **options)
    for rows in chunk_ranges(len(encoded)):
        yield source.chunk(rows)


def gather_chunks(
    cache: ChunkCache | None,
    n_rows: int,
    compute: Callable[[range], dict[str, torch.Tensor]],
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """Every chunk of a per-row result (read back, or computed and cached) in whole tensors."""
    out: dict[str, torch.Tensor] = {}
    for rows in chunk_ranges(n_rows):
        for name, part in cached_chunk(cache, rows, compute).items():
            if name not in out:
                out[name] = part.new_empty((n_rows, *part.shape[1:]))
            out[name][rows.start : rows.stop] = part
        bar.update(len(rows))
    bar.close()
    return out


def _compute_chunks(
    loaded: LoadedModel,
    encoded: Encoded,
    layer: int | None,
    last_only: bool,
    batch_size: int,
    dtype: torch.dtype,
    rows: Sequence[int],
    desc: str,
) -> Iterator[torch.Tensor]:
    batches = torch.as_tensor(list(rows), dtype=torch.long).split(batch_size)
    for index in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 4):
        batch = encoded.subset(index)
        hidden = forward_hidden(loaded.model, batch, layer)
        if last_only:
            hidden = hidden[:, -1]
        yield hidden.to("cpu", dtype)


def run_top_layers(model: torch.nn.Module, hidden: torch.Tensor, batch: Encoded, start: int) -> torch.Tensor:
    """Blocks start.. and the final norm of a Llama-family model, from the input of block `start`.

    (B, T, d) -> (B, T, d): the same result as the full forward pass, from cached states.
    """
    body = model.base_model
    positions = batch.position_ids.to(hidden.device)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=batch.attention_mask.to(hidden.device),
        cache=None,
        position_ids=positions,
    )
    rotary = body.rotary_emb(hidden, positions)
    for layer in decoder_layers(model)[start:]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    return body.norm(hidden)


@torch.no_grad()
def final_hidden_from(
    loaded: LoadedModel,
    lower: torch.Tensor,
    encoded: Encoded,
    start: int,
    batch_size: int = 64,
    desc: str = "top blocks",
) -> torch.Tensor:
    """(N, d) last-position final hidden states from cached inputs of block `start` (N, T, d)."""
    device = next(loaded.model.parameters()).device
    out = []
    batches = range(0, len(encoded), batch_size)
    for s in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 4):
        batch = encoded.subset(slice(s, s + batch_size))
        out.append(
            run_top_layers(loaded.model, lower[s : s + batch_size].to(device), batch, start)[:, -1].cpu()
        )
    return torch.cat(out)
