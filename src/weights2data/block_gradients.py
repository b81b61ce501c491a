"""Per-example gradients of the decoder blocks a finetune changed, never materialised (DESIGN §3).

A linear layer y_t = W x_t has, for one document, the loss gradient G = Σ_t δ_t x_tᵀ with
δ_t = ∂loss/∂y_t: rank ≤ T, like the LM head's. So for each linear layer of the chosen
blocks, with ΔW = W_base − W_finetuned:

- ⟨G, ΔW⟩ = Σ_t δ_tᵀ (ΔW x_t) is exact for one extra forward-sized matmul;
- ‖G‖² = Σ_{t,s} (δ_t·δ_s)(x_t·x_s) is exact from two T × T Grams;
- cross terms ⟨G, G'⟩ come from a Kronecker-factored sketch R_outᵀ G R_in =
  Σ_t (R_outᵀ δ_t)(x_tᵀ R_in), one per layer (the LoGra idea), unbiased like the head's.

The blocks run from the cached input of the first chosen block, and one backward pass per
batch gives every δ_t (the weights need no gradient: hooks read the activations' gradients).
The per-document results are cached in resumable chunks like hidden states.
Norm weights are left out (0.03 % of a SmolLM2 block's parameters).

With `precondition`, each layer's gradients are rescaled as Adam would step them, D ∘ G with
D_oi = α_o β_i = 1/√v̂_oi from Adafactor's rank-one estimate of their second moment, so that
D ∘ G = Σ_t (α ∘ δ_t)(β ∘ x_t)ᵀ: the same factored form, every term above still exact. The row
and column sums of v̂ come from the exact per-document Grams, ‖row o of G‖² = Σ_{t,s} δ_to δ_so
(x_t·x_s), over a pilot sample of PILOT_ROWS documents taken before the pass. Under torchrun
the pilot is drawn from the whole corpus, each rank sums the Grams of its own pilot documents and
an all-reduce adds them up (`CorpusSlice`): the scales one process fits, up to float rounding
(a pilot document's forward pass may share its batch with other documents than in one process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.adapters import DenseDelta, WeightDelta, weight_delta
from weights2data.data import Encoded
from weights2data.errors import W2DError
from weights2data.features import (
    ChunkCache,
    HiddenStates,
    cache_key,
    chunk_ranges,
    encoded_fingerprint,
    gather_chunks,
    run_top_layers,
)
from weights2data.lm_features import KroneckerSketch
from weights2data.models import LoadedModel, decoder_layers, first_changed_layer
from weights2data.precondition import WHOLE, CorpusSlice, corpus_mean, factored_scales, fingerprint
from weights2data.selection import DenseFeatures

DEFAULT_LAYER_DIM = 256  # per linear layer: a 16 × 16 sketch
PILOT_ROWS = 512  # documents whose gradients estimate each layer's second moments (`precondition`)

# the summed loss of a batch of documents, from their final normed hidden states (B, T, d)
BatchLoss = Callable[[Tensor, Encoded, slice], Tensor]


def first_block(base: LoadedModel, finetuned: LoadedModel, blocks: int) -> int:
    """Index of the first block whose gradients are taken: the top `blocks` that changed (-1: all)."""
    if blocks == 0 or blocks < -1:
        raise W2DError(f"blocks must be positive, or -1 for every changed block (got {blocks})")
    if not hasattr(finetuned.model.base_model, "rotary_emb"):
        raise W2DError("block gradients support Llama-family models; use head gradients for this model")
    n_layers = len(decoder_layers(finetuned.model))
    changed = first_changed_layer(base.model, finetuned.model)
    return changed if blocks == -1 else max(n_layers - blocks, changed)


@dataclass
class LayerSketch:
    """One linear layer: its weight change and the Kronecker sketch of its gradients."""

    delta: WeightDelta  # (out, in) ΔW = W_base − W_finetuned, dense or a LoRA adapter's factors
    sketch: KroneckerSketch  # rows side: out, columns side: in
    scales: tuple[Tensor, Tensor] | None = None  # (out,) α and (in,) β of the preconditioner D = α βᵀ


def layer_sketches(
    base: LoadedModel,
    finetuned: LoadedModel,
    start: int,
    dim: int,
    kind: str,
    seed: int,
    device: torch.device | str,
) -> dict[str, LayerSketch]:
    """A sketch per changed linear layer of blocks start.., keyed "block.module", each with its own
    matrices. A layer the finetune left as it was only adds to the gradients' norms: left out. With
    a LoRA adapter, the adapted layers, their ΔW kept as the adapter's factors."""
    tuned_layers = decoder_layers(finetuned.model)
    names = {id(m): n for n, m in finetuned.model.named_modules()}
    adapter = finetuned.adapter
    out = {}
    for i in range(start, len(tuned_layers)):
        prefix = names[id(tuned_layers[i])]
        for name, module in tuned_layers[i].named_modules():
            full = f"{prefix}.{name}"
            if not isinstance(module, torch.nn.Linear) or (
                adapter is not None and full not in adapter.layers
            ):
                continue
            delta = weight_delta(base, finetuned, full, device)
            if isinstance(delta, DenseDelta) and not delta.weight.any():
                continue
            sketch = KroneckerSketch(*delta.shape, dim=dim, seed=seed + 7919 * (len(out) + 1), kind=kind)
            out[f"{i}.{name}"] = LayerSketch(delta, sketch.to(device))
    return out


@contextmanager
def activation_taps(model: torch.nn.Module, start: int, names: set[str]):
    """Record each named linear layer's input x (B, T, in) and output gradient δ (B, T, out)."""
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    handles = []

    def tap(name: str):
        def hook(_module, args, output) -> None:
            inputs[name] = args[0].detach()
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    for i, layer in enumerate(decoder_layers(model)[start:], start):
        for name, module in layer.named_modules():
            if f"{i}.{name}" in names:
                handles.append(module.register_forward_hook(tap(f"{i}.{name}")))
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only activation gradients are needed
    try:
        yield inputs, grads
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def layer_terms(x: Tensor, delta_out: Tensor, layer: LayerSketch) -> tuple[Tensor, Tensor, Tensor]:
    """(B,) ⟨G, ΔW⟩, (B,) ‖G‖² and (B, a·b) sketch of G = Σ_t δ_t x_tᵀ for a batch of documents
    (of D ∘ G when the layer has scales)."""
    x, d = x.float(), delta_out.float()  # (B, T, in), (B, T, out); zero at padded positions
    if layer.scales is not None:
        d, x = d * layer.scales[0], x * layer.scales[1]
    target = (layer.delta.times(x) * d).sum((1, 2))
    sq_norm = ((d @ d.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
    sketched = torch.einsum("bta,btc->bac", d @ layer.sketch.r_e, x @ layer.sketch.r_h)
    return target, sq_norm, sketched.reshape(x.shape[0], -1)


def layer_moments(x: Tensor, delta_out: Tensor) -> tuple[Tensor, Tensor]:
    """(out,) Σ_b ‖row o of G_b‖² and (in,) Σ_b ‖column i of G_b‖² over a batch, G_b = Σ_t δ_t x_tᵀ."""
    x, d = x.double(), delta_out.double()  # (B, T, in), (B, T, out)
    rows = (d * (x @ x.transpose(1, 2) @ d)).sum((0, 1))  # Σ_{t,s} δ_to δ_so (x_t·x_s)
    cols = (x * (d @ d.transpose(1, 2) @ x)).sum((0, 1))  # Σ_{t,s} x_ti x_si (δ_t·δ_s)
    return rows, cols


def pilot_rows(n_docs: int, seed: int) -> Tensor:
    """The sorted corpus rows whose gradients estimate the preconditioner: PILOT_ROWS of them at random."""
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    return order[:PILOT_ROWS].sort().values


def pilot_share(n_docs: int, seed: int, corpus: CorpusSlice) -> Tensor:
    """The whole corpus's pilot rows that fall in this slice of `n_docs`, numbered within it."""
    rows = pilot_rows(corpus.corpus_rows(n_docs), seed)
    return rows[(rows >= corpus.offset) & (rows < corpus.offset + n_docs)] - corpus.offset


@dataclass
class BlockFeatures:
    features: DenseFeatures  # sketched block gradients with exact ⟨g, Δ⟩ and ‖g‖²
    start: int  # first block included
    layers: int  # linear layers sketched
    timings: dict


def block_features(
    base: LoadedModel,
    finetuned: LoadedModel,
    encoded: Encoded,
    batch_loss: BatchLoss,
    *,
    blocks: int,
    dim: int = DEFAULT_LAYER_DIM,
    projection: str = "rademacher",
    seed: int = 0,
    cache_root: Path | None = None,
    loss_key: str | None = None,
    batch_size: int = 16,
    at: LoadedModel | None = None,
    precondition: bool = False,
    corpus: CorpusSlice = WHOLE,
    progress: bool = True,
) -> BlockFeatures | None:
    """Gradients of the linear layers of the top changed blocks, against ΔW = base − finetuned.

    Taken at the finetuned weights, or at `at` (e.g. the base model, or a pseudo-expert);
    with `precondition`, each layer's rescaled by its Adafactor estimate (module docstring),
    fitted on a pilot of the whole `corpus` when `encoded` is one slice of it.
    None when the finetune changed no block (a head-only finetune). `batch_loss` gives the
    summed loss of a batch from its final normed hidden states (B, T, d); documents must not
    interact in it (each document's δ is then its own gradient). With `cache_root`, the inputs
    of the first block are cached, and so are the gradients in resumable chunks when `loss_key`
    names what `batch_loss` computes (the rest of their key: weights, inputs and sketch).
    """
    at = at or finetuned
    start = first_block(base, finetuned, blocks)
    n_layers = len(decoder_layers(finetuned.model))
    if start >= n_layers:
        return None
    started = time.time()
    device = next(at.model.parameters()).device
    layers = layer_sketches(base, finetuned, start, dim, projection, seed, device)
    if not layers:
        return None
    n_docs = len(encoded)
    bar = tqdm(
        total=n_docs, desc=f"gradients of blocks {start}+", unit="doc", disable=not progress or n_docs < 256
    )
    with activation_taps(at.model, start, set(layers)) as taps, torch.enable_grad():
        grads = BlockPass(at, encoded, batch_loss, start, layers, taps, cache_root, batch_size)
        fit = partial(grads.scales, pilot_share(n_docs, seed, corpus), corpus)
        # a torchrun rank's scales depend on every rank's rows: fitted afresh each run, keyed by value
        scales = fit() if precondition and corpus.total is not None else None
        cache = None
        if cache_root is not None and loss_key is not None:
            key = cache_key(
                device,
                base=base.fingerprint,
                finetuned=finetuned.fingerprint,
                at=at.fingerprint,
                inputs=encoded_fingerprint(encoded),
                start=start,
                settings=[dim, projection, seed],
                loss=loss_key,
                rows=len(encoded),
                **({"layers": sorted(layers)} if finetuned.adapter is not None else {}),
                **({"precondition": f"adafactor:{PILOT_ROWS}"} if precondition else {}),
                **({"pilot_fit": fingerprint(list(scales.values()))} if scales is not None else {}),
            )
            cache = ChunkCache(Path(cache_root), "blocks", key)
        if precondition and scales is None:
            scales = fit() if cache is None else cache.beside("scales", fit)
        if scales is not None:
            for name, layer in layers.items():
                layer.scales = (scales[f"{name}.rows"].to(device), scales[f"{name}.cols"].to(device))
        out = gather_chunks(cache, n_docs, grads.chunk, bar)
    delta = torch.cat(
        [layer.delta.kron_sketch(layer.sketch.r_e, layer.sketch.r_h) for layer in layers.values()]
    )
    features = DenseFeatures(
        out["grads"], delta.cpu(), target_dots=out["target_dots"], sq_norms=out["sq_norms"]
    )
    features.delta_sq_norm = sum(layer.delta.sq_norm() for layer in layers.values())
    timings = {
        "block_gradients_s": round(time.time() - started, 2),
        "gradient_blocks": f"{start}-{n_layers - 1}",
    }
    return BlockFeatures(features, start, len(layers), timings)


class BlockPass:
    """The blocks' gradient terms for one chunk of documents, from the cached inputs of block `start`.

    Those inputs are opened only once a chunk has to be computed: cached gradients need no model pass.
    """

    def __init__(
        self,
        at: LoadedModel,
        encoded: Encoded,
        batch_loss: BatchLoss,
        start: int,
        layers: dict[str, LayerSketch],
        taps: tuple[dict[str, Tensor], dict[str, Tensor]],
        cache_root: Path | None,
        batch_size: int,
    ) -> None:
        self.at, self.encoded, self.batch_loss, self.start = at, encoded, batch_loss, start
        self.layers, self.taps, self.cache_root, self.batch_size = layers, taps, cache_root, batch_size

    @cached_property
    def lower(self) -> HiddenStates:
        desc = f"inputs of block {self.start}"
        return HiddenStates(self.at, self.encoded, layer=self.start, cache_root=self.cache_root, desc=desc)

    def chunk(self, rows: range) -> dict[str, Tensor]:
        lower = self.lower.chunk(rows)
        parts = [self._batch(lower, rows, s) for s in range(0, len(rows), self.batch_size)]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def scales(self, rows: Tensor, corpus: CorpusSlice = WHOLE) -> dict[str, Tensor]:
        """Each layer's preconditioner scales "<layer>.rows" (out,) α and "<layer>.cols" (in,) β,
        fitted on the gradients of the sorted `rows` of these documents (this slice's share of the
        pilot: the moments are summed over every slice of `corpus`)."""
        row_sums = {
            name: torch.zeros(layer.sketch.vocab, dtype=torch.float64) for name, layer in self.layers.items()
        }
        col_sums = {
            name: torch.zeros(layer.sketch.hidden, dtype=torch.float64) for name, layer in self.layers.items()
        }
        for chunk in chunk_ranges(len(self.encoded)):
            local = rows[(rows >= chunk.start) & (rows < chunk.stop)] - chunk.start
            if len(local) == 0:
                continue
            lower = self.lower.sample(chunk, local)  # (len(local), T, d)
            for part in torch.arange(len(local)).split(self.batch_size):
                for name, (x, d) in self._activations(lower[part], local[part] + chunk.start).items():
                    row_sum, col_sum = layer_moments(x, d)
                    row_sums[name] += row_sum.cpu()
                    col_sums[name] += col_sum.cpu()
        out = {}
        for name in self.layers:  # the same order on every rank: one all-reduce each, in step
            means = (corpus_mean(sums[name], len(rows), corpus) for sums in (row_sums, col_sums))
            alpha, beta = factored_scales(*means)
            out[f"{name}.rows"], out[f"{name}.cols"] = alpha, beta
        return out

    def _batch(self, lower: Tensor, rows: range, s: int) -> dict[str, Tensor]:
        """Rows s.. of the chunk: one forward from block `start` and one backward."""
        sub = rows[s : s + self.batch_size]
        taps = self._activations(lower[s : s + len(sub)], slice(sub.start, sub.stop))
        target_dots, sq_norms = torch.zeros(len(sub)), torch.zeros(len(sub))
        parts = []
        for name, layer in self.layers.items():
            dot, sq, sk = layer_terms(*taps[name], layer)
            target_dots += dot.cpu()
            sq_norms += sq.cpu()
            parts.append(sk)
        return {"grads": torch.cat(parts, dim=1).cpu(), "target_dots": target_dots, "sq_norms": sq_norms}

    def _activations(self, lower: Tensor, index: slice | Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each layer's inputs x (B, T, in) and output gradients δ (B, T, out), zero at padding, for the
        corpus rows `index` whose block-`start` inputs are `lower`: one forward and one backward."""
        inputs, grads = self.taps
        batch = self.encoded.subset(index)
        device = next(self.at.model.parameters()).device
        h = lower.to(device).requires_grad_(True)
        final = run_top_layers(self.at.model, h, batch, self.start)
        self.batch_loss(final, batch, index).backward()
        mask = batch.attention_mask.to(device, torch.float32)[:, :, None]  # (B, T, 1)
        return {name: (inputs[name] * mask, grads[name] * mask) for name in self.layers}
