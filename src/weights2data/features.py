"""Hidden-state extraction with a resumable on-disk cache.

Everything downstream of the frozen part of a model (the trained head or top blocks, the
per-example head gradients) is a cheap function of hidden states, so the model's forward
pass runs once per document and its outputs are stored in chunks keyed by the body
weights, the token ids and the layer. A killed run keeps its finished chunks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask

from weights2data.data import Encoded
from weights2data.errors import W2DError
from weights2data.models import LoadedModel, decoder_layers
from weights2data.store import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024


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
    return h.hexdigest()


def hidden_states(
    loaded: LoadedModel,
    encoded: Encoded,
    *,
    layer: int | None = None,
    last_only: bool = False,
    cache_root: Path | None = None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    desc: str = "hidden states",
) -> torch.Tensor:
    """(N, d) at the last position when last_only, else (N, T, d); cached when cache_root is set.

    `layer=None` is the final normed hidden state (what the LM head reads); an integer is
    the input of that block (what a top:N finetune reads).
    """
    chunks = list(
        hidden_chunks(
            loaded, encoded, layer=layer, last_only=last_only, cache_root=cache_root,
            batch_size=batch_size, dtype=dtype, desc=desc,
        )
    )  # fmt: skip
    return torch.cat(chunks) if chunks else torch.empty(0)


def hidden_chunks(
    loaded: LoadedModel,
    encoded: Encoded,
    *,
    layer: int | None = None,
    last_only: bool = False,
    cache_root: Path | None = None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    desc: str = "hidden states",
) -> Iterator[torch.Tensor]:
    """The rows of `hidden_states`, in order, one chunk of up to CHUNK_ROWS at a time.

    With a cache, finished chunks are read back and missing ones computed and written
    atomically, so a killed run resumes; at most one chunk is held in memory.
    """
    if cache_root is None:
        yield from _compute_chunks(
            loaded, encoded, layer, last_only, batch_size, dtype, range(len(encoded)), desc
        )
        return
    key = {
        "weights": loaded.body_fingerprint if layer is None else loaded.prefix_fingerprint(layer),
        "inputs": encoded_fingerprint(encoded),
        "layer": layer,
        "last_only": last_only,
        "dtype": str(dtype),
        "rows": len(encoded),
    }
    folder = cache_root / "hidden" / hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:20]
    meta_path = folder / "meta.json"
    if meta_path.exists() and read_json(meta_path) != key:
        raise W2DError(f"hidden-state cache {folder} does not match its key; delete the folder")
    write_json(meta_path, key)
    for start in range(0, len(encoded), CHUNK_ROWS):
        path = folder / f"chunk_{start:09d}.safetensors"
        if path.exists():
            yield load_file(str(path))["hidden"]
            continue
        rows = range(start, min(start + CHUNK_ROWS, len(encoded)))
        chunk = torch.cat(
            list(_compute_chunks(loaded, encoded, layer, last_only, batch_size, dtype, rows, desc))
        )
        with atomic_path(path) as tmp:
            save_file({"hidden": chunk.contiguous()}, str(tmp))
        yield chunk


def _compute_chunks(
    loaded: LoadedModel,
    encoded: Encoded,
    layer: int | None,
    last_only: bool,
    batch_size: int,
    dtype: torch.dtype,
    rows: range,
    desc: str,
) -> Iterator[torch.Tensor]:
    batches = range(rows.start, rows.stop, batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 4):
        batch = encoded.subset(slice(start, min(start + batch_size, rows.stop)))
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
