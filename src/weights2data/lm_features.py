"""Language-modelling head gradients of corpus documents, never materialised (DESIGN §3).

Document i's next-token loss gradient w.r.t. the LM head W (V × d) is
g_i = Σ_t e_t h_tᵀ, with h_t the final hidden state at a scored position and
e_t = softmax(W h_t) − onehot(y_{t+1}). It has rank ≤ T, so:

- ⟨g_i, Δ⟩ = Σ_t e_tᵀ (Δ h_t) = Σ_t (Δᵀ e_t)·h_t is exact for one extra head-sized matmul
  per token (e_t against [Δ | R_e], which also yields the sketch's R_eᵀ e_t);
- ‖g_i‖² = Σ_{t,s} (e_t·e_s)(h_t·h_s) is exact from a T × T Gram per document;
- cross terms ⟨g_i, g_j⟩ come from a Kronecker-factored sketch
  Φ(g) = R_eᵀ g R_h = Σ_t (R_eᵀ e_t)(h_tᵀ R_h), with R_e (V × a) and R_h (d × b) random
  (a · b = the projection dimension) and scaled so that E⟨Φ(g), Φ(g')⟩ = ⟨g, g'⟩.

Hidden states come from the chunked on-disk cache of `features` (float16 by default) and
are consumed chunk by chunk: what stays in memory is the (N, a·b) sketch and the exact
(N,) terms, never the (N, T, d) hidden states. The per-document results are cached in chunks
the same way, so a killed run resumes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.adapters import DenseDelta, LowRankDelta, WeightDelta, weight_delta
from weights2data.config import GRAD_AT
from weights2data.data import Encoded, scored_positions
from weights2data.errors import W2DError
from weights2data.features import ChunkCache, HiddenStates, cache_key, encoded_fingerprint, gather_chunks
from weights2data.models import LoadedModel, head_name
from weights2data.selection import DenseFeatures

log = logging.getLogger(__name__)

PROJECTIONS = ("rademacher", "normal")
DEFAULT_DIM = 4096


# ---------------------------------------------------------------- the Kronecker sketch


def kron_factors(dim: int) -> tuple[int, int]:
    """Split `dim` into a · b with b the largest divisor ≤ √dim (4096 → 64 × 64); a is the vocabulary side."""
    if dim < 1:
        raise W2DError(f"the sketch dimension must be positive (got {dim})")
    b = max(i for i in range(1, math.isqrt(dim) + 1) if dim % i == 0)
    return dim // b, b


@dataclass
class KroneckerSketch:
    """Φ(G) = R_eᵀ G R_h for G of shape (V, d), flattened to a · b; unbiased for inner products.

    R_e and R_h are independent, each with E[R Rᵀ] = I: i.i.d. ±1/√cols (rademacher) or
    N(0, 1/cols) entries, orthogonalised by default (orthogonal random features).
    """

    vocab: int
    hidden: int
    dim: int = DEFAULT_DIM
    seed: int = 0
    kind: str = "rademacher"
    factors: tuple[int, int] | None = None
    orthogonal: bool = True
    r_e: Tensor = field(init=False)  # (V, a), entries of variance 1/a
    r_h: Tensor = field(init=False)  # (d, b), entries of variance 1/b

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise W2DError(f"unknown projection '{self.kind}': choose from {', '.join(PROJECTIONS)}")
        a, b = self.factors or kron_factors(self.dim)
        if a * b != self.dim:
            raise W2DError(f"sketch factors {a} × {b} do not multiply to the dimension {self.dim}")
        self.factors = (a, b)
        generator = torch.Generator().manual_seed(self.seed)
        self.r_e = self._matrix(self.vocab, a, generator)
        self.r_h = self._matrix(self.hidden, b, generator)

    def _matrix(self, rows: int, cols: int, generator: torch.Generator) -> Tensor:
        if self.kind == "rademacher":
            m = torch.randint(0, 2, (rows, cols), generator=generator).float().mul_(2).sub_(1)
        else:
            m = torch.randn(rows, cols, generator=generator)
        if not self.orthogonal:
            return m.div_(math.sqrt(cols))
        # orthogonal random features: orthonormal columns scaled by √(rows/cols) keep E[R Rᵀ] = I
        # (the draw is invariant under signed permutations) and lower the variance; with
        # cols ≥ rows, orthonormal rows make R Rᵀ = I exactly.
        tall = cols <= rows
        q = _orthonormal_columns(m if tall else m.T)
        return q.mul_(math.sqrt(rows / cols)) if tall else q.T.contiguous()

    def to(self, device: torch.device | str) -> KroneckerSketch:
        self.r_e, self.r_h = self.r_e.to(device), self.r_h.to(device)
        return self

    def matrix(self, g: Tensor) -> Tensor:
        """Φ of one explicit (V, d) matrix (Δ, or a materialised gradient in tests), flattened."""
        g = g.to(self.r_e.device, torch.float32)
        return ((self.r_e.T @ g) @ self.r_h).reshape(-1)


def _orthonormal_columns(m: Tensor) -> Tensor:
    """Q of m = QR with R's diagonal positive (Cholesky QR: one small Gram, fast for tall m)."""
    gram = m.T.double() @ m.double()
    upper = torch.linalg.cholesky(gram).T  # R
    return m @ torch.linalg.inv(upper).float()


# ---------------------------------------------------------------- per-batch exact terms and sketch


@dataclass
class HeadView:
    """One model's head, read at that model's hidden states: logits = h Wᵀ (+ bias)."""

    weight: Tensor  # (V, d)
    bias: Tensor | None = None


@dataclass
class BatchTerms:
    sketch: Tensor  # (B, a·b) Φ(g_i)
    target_dots: Tensor  # (B,) ⟨g_i, Δ⟩, exact
    sq_norms: Tensor  # (B,) ‖g_i‖², exact
    loss_sum: Tensor  # (B,) summed next-token loss under the first view
    tokens: Tensor  # (B,) scored positions


def batch_terms(
    hiddens: list[Tensor],
    views: list[HeadView],
    input_ids: Tensor,
    attention_mask: Tensor,
    delta: Tensor | WeightDelta,
    sketch: KroneckerSketch,
    mode: str = "full",
    combined: Tensor | None = None,
    target_mask: Tensor | None = None,
) -> BatchTerms:
    """Exact ⟨g, Δ⟩ and ‖g‖², the sketch Φ(g) and the loss, for a batch of documents.

    hiddens[m] (B, T, d) are the final hidden states read by views[m]; the gradient is the sum
    over all views (one view: gradients at one model; two: the `both` option). The loss is the
    first view's. Per scored position: one head matmul for the logits, then one matmul of the
    softmax errors against [Δ | R_e] (V × (d + a); pass it as `combined` to build it once)
    giving both Δᵀ e_t (so e_tᵀ Δ h_t = (Δᵀ e_t)·h_t) and R_eᵀ e_t. A LoRA head's Δ = (scale · B) A
    enters as [scale · B | R_e] (V × (r + a)), then A: nothing V × d is formed.
    """
    device = sketch.r_e.device
    scored = scored_positions(attention_mask, mode, target_mask).to(device)
    doc, pos = torch.nonzero(scored, as_tuple=True)  # row-major: each document's positions contiguous
    targets = input_ids.to(device)[doc, pos + 1]
    left, right = delta_factors(delta)
    n_docs, q = scored.shape[0], left.shape[1]
    if combined is None:
        combined = torch.cat([left, sketch.r_e], dim=1)
    errors, hidden, projected, rows, dots = [], [], [], [], []
    loss_sum = torch.zeros(n_docs, device=device)
    picks = torch.arange(len(targets), device=device)
    for m, (h_all, view) in enumerate(zip(hiddens, views, strict=True)):
        h = h_all.to(device)[doc, pos].float()  # (M, d)
        logits = F.linear(h, view.weight, view.bias)  # (M, V)
        e = torch.softmax(logits, dim=-1)  # one fused pass over the (M, V) block
        del logits
        if m == 0:  # −log p[y]; clamped where p[y] underflows (a loss above ~87 nats)
            loss_sum.index_add_(0, doc, -e[picks, targets].clamp_min(1e-38).log())
        e[picks, targets] -= 1.0  # e = p − onehot(y)
        z = e @ combined  # (M, q + a): Δᵀ e_t (or Bᵀ e_t) | R_eᵀ e_t
        zd = z[:, :q] if right is None else z[:, :q] @ right
        dots.append(torch.linalg.vecdot(zd, h))  # (M,) e_tᵀ Δ h_t
        projected.append(z[:, q:])
        errors.append(e)
        hidden.append(h)
        rows.append(doc)
    target_dots = torch.zeros(n_docs, device=device).index_add_(0, torch.cat(rows), torch.cat(dots))
    if len(errors) == 1:  # positions already grouped by document: no copies
        e, h, er, rows = errors[0], hidden[0], projected[0], rows[0]
    else:  # group every view's positions by document (one copy)
        rows = torch.cat(rows)
        order = torch.argsort(rows, stable=True)
        e, h, er = torch.cat(errors)[order], torch.cat(hidden)[order], torch.cat(projected)[order]
        rows = rows[order]
    hr = h @ sketch.r_h  # (M, b)
    a, b = sketch.factors
    sketched = torch.zeros(n_docs, a * b, device=device)
    sq_norms = torch.zeros(n_docs, device=device)
    counts = torch.bincount(rows, minlength=n_docs).tolist()
    start = 0
    for i, n in enumerate(counts):
        if n:
            block = slice(start, start + n)
            eb, hb = e[block], h[block]
            sq_norms[i] = ((eb @ eb.T) * (hb @ hb.T)).sum()  # Σ_{t,s} (e_t·e_s)(h_t·h_s)
            sketched[i] = (er[block].T @ hr[block]).reshape(-1)  # Σ_t (R_eᵀ e_t)(h_tᵀ R_h)
            start += n
    tokens = scored.sum(1)
    return BatchTerms(sketched, target_dots, sq_norms, loss_sum, tokens)


# ---------------------------------------------------------------- corpus features


@dataclass
class LMFeatures:
    """Sketched LM-head gradients with exact target terms, and per-document finetuned loss."""

    features: DenseFeatures
    losses: Tensor  # (N,) mean next-token loss under the finetuned model (NaN: nothing scored)
    tokens: Tensor  # (N,) scored positions per document
    timings: dict


def head_view(loaded: LoadedModel) -> HeadView:
    head = loaded.model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return HeadView(head.weight.detach().float(), None if bias is None else bias.detach().float())


def head_delta(base: LoadedModel, finetuned: LoadedModel) -> WeightDelta:
    """Δ = W_head(base) − W_head(finetuned), (V, d): for tied models the embedding difference, for
    a LoRA adapter on the head its factors."""
    device = finetuned.model.get_output_embeddings().weight.device
    return weight_delta(base, finetuned, head_name(finetuned.model), device)


def delta_factors(delta: Tensor | WeightDelta) -> tuple[Tensor, Tensor | None]:
    """Δ as left @ right: (Δ, None) for a matrix; (scale · B, A) for low-rank factors."""
    if isinstance(delta, LowRankDelta):
        return delta.b * delta.scale, delta.a
    return (delta.weight if isinstance(delta, DenseDelta) else delta), None


def lm_features(
    base: LoadedModel,
    finetuned: LoadedModel,
    encoded: Encoded,
    *,
    lm_loss: str = "full",
    grad_at: str = "finetuned",
    dim: int = DEFAULT_DIM,
    projection: str = "rademacher",
    seed: int = 0,
    factors: tuple[int, int] | None = None,
    cache_root: Path | None = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 16,
    progress: bool = True,
) -> LMFeatures:
    """Φ(g_i), exact ⟨g_i, Δ⟩ and ‖g_i‖², and the finetuned loss for every document of `encoded`.

    `encoded` comes from data.encode_lm (right-padded). Gradients are taken at the finetuned
    weights (or `base`, or `both`: the sum of the two), Δ = W_head(base) − W_head(finetuned).
    With `cache_root`, the per-document results are stored under it in chunks keyed by both
    models' weights, the inputs and the sketch: the vocabulary-sized head pass over a corpus
    runs once, like its forward pass, and a killed run resumes from its last finished chunk.
    """
    if grad_at not in GRAD_AT:
        raise W2DError(f"unknown --grad-at '{grad_at}': choose from {', '.join(GRAD_AT)}")
    scored_positions(encoded.attention_mask[:1], lm_loss)  # validates the mode
    started = time.time()
    device = next(finetuned.model.parameters()).device
    delta = head_delta(base, finetuned)
    sketch = KroneckerSketch(*delta.shape, dim, seed, projection, factors).to(device)
    cache = None
    if cache_root is not None:
        key = cache_key(
            device,
            base=base.fingerprint,
            finetuned=finetuned.fingerprint,
            inputs=encoded_fingerprint(encoded),
            dtype=str(dtype),
            settings=[lm_loss, grad_at, dim, projection, seed, None if factors is None else list(factors)],
            rows=len(encoded),
        )
        cache = ChunkCache(Path(cache_root), "lm-features", key)
    hidden_options = {"cache_root": cache_root, "dtype": dtype}
    head = HeadPass(base, finetuned, encoded, delta, sketch, grad_at, lm_loss, batch_size, hidden_options)
    n_docs = len(encoded)
    bar = tqdm(total=n_docs, desc="LM head gradients", unit="doc", disable=not progress or n_docs < 256)
    out = gather_chunks(cache, n_docs, head.chunk, bar)
    features = DenseFeatures(
        out["grads"],
        delta.kron_sketch(sketch.r_e, sketch.r_h).cpu(),
        target_dots=out["target_dots"],
        sq_norms=out["sq_norms"],
    )
    features.delta_sq_norm = delta.sq_norm()  # exact, not the sketched norm
    empty = int((out["tokens"] == 0).sum())
    if empty:
        log.warning(
            "%d corpus documents have fewer than 2 tokens: zero gradient, never selected first", empty
        )
    timings = {
        "hidden_states_s": round(head.hidden_s, 2),
        "head_gradients_s": round(head.head_s, 2),
        "features_s": round(time.time() - started, 2),
        "sketch": f"{sketch.factors[0]}x{sketch.factors[1]}",
        "cached": head.computed_rows == 0,
    }
    return LMFeatures(features, out["losses"], out["tokens"], timings)


class HeadPass:
    """The LM head pass over one chunk of documents: their hidden states in, their terms out.

    The models' hidden states are opened only once a chunk has to be computed, so a corpus whose
    head gradients are all cached needs neither its hidden states nor a forward pass.
    """

    def __init__(
        self,
        base: LoadedModel,
        finetuned: LoadedModel,
        encoded: Encoded,
        delta: Tensor,
        sketch: KroneckerSketch,
        grad_at: str,
        lm_loss: str,
        batch_size: int,
        hidden_options: dict,
    ) -> None:
        self.base, self.finetuned, self.encoded = base, finetuned, encoded
        self.delta, self.sketch, self.lm_loss, self.batch_size = delta, sketch, lm_loss, batch_size
        # the finetuned view comes first: it gives the loss; in `base` mode it contributes no gradient
        self.names = ["finetuned", "base"] if grad_at != "finetuned" else ["finetuned"]
        models = {"finetuned": finetuned, "base": base}
        self.views = [head_view(models[n]) for n in self.names]
        self.combined = torch.cat([delta_factors(delta)[0], sketch.r_e], dim=1)  # (V, q + a), for every view
        self.grad_views = [i for i, n in enumerate(self.names) if grad_at in (n, "both")]
        self.hidden_options = hidden_options  # HiddenStates' keyword options: cache_root, dtype
        self.hidden_s = self.head_s = 0.0
        self.computed_rows = 0

    @cached_property
    def sources(self) -> dict[str, HiddenStates]:
        """Each view's hidden states; a base model with the finetuned body reads the finetuned ones."""
        models = {"finetuned": self.finetuned, "base": self.base}
        same_body = self.base.body_fingerprint == self.finetuned.body_fingerprint
        return {
            n: HiddenStates(models[n], self.encoded, desc=f"{n} hidden states", **self.hidden_options)
            for n in self.names
            if n == "finetuned" or not same_body
        }

    def _hidden(self, rows: range) -> dict[str, Tensor]:
        chunk = {n: source.chunk(rows) for n, source in self.sources.items()}
        return {n: chunk.get(n, chunk["finetuned"]) for n in self.names}

    def chunk(self, rows: range) -> dict[str, Tensor]:
        tick = time.time()
        hidden = self._hidden(rows)
        tock = time.time()
        parts = []
        for s in range(0, len(rows), self.batch_size):
            sub = rows[s : s + self.batch_size]
            batch = self.encoded.subset(slice(sub.start, sub.stop))
            parts.append(self._batch([hidden[n][s : s + len(sub)] for n in self.names], batch))
        self.hidden_s += tock - tick
        self.head_s += time.time() - tock
        self.computed_rows += len(rows)
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def _batch(self, hs: list[Tensor], batch: Encoded) -> dict[str, Tensor]:
        if self.grad_views == [0]:
            terms = batch_terms(
                hs,
                self.views,
                batch.input_ids,
                batch.attention_mask,
                self.delta,
                self.sketch,
                self.lm_loss,
                self.combined,
                batch.target_mask,
            )
        else:  # loss from the finetuned view; gradient from grad_views
            terms = _terms_with_loss_view(
                hs, self.views, self.combined, self.grad_views, batch, self.delta, self.sketch, self.lm_loss
            )
        tokens = terms.tokens.cpu()
        return {
            "grads": terms.sketch.cpu(),
            "target_dots": terms.target_dots.cpu(),
            "sq_norms": terms.sq_norms.cpu(),
            "losses": (terms.loss_sum.cpu() / tokens.clamp_min(1)).masked_fill(tokens == 0, math.nan),
            "tokens": tokens,
        }


def _terms_with_loss_view(hs, views, combined, grad_views, batch, delta, sketch, lm_loss) -> BatchTerms:
    """`base` / `both`: the gradient sums the chosen views; the loss still comes from the finetuned one."""
    terms = batch_terms(
        [hs[i] for i in grad_views],
        [views[i] for i in grad_views],
        batch.input_ids,
        batch.attention_mask,
        delta,
        sketch,
        lm_loss,
        combined,
        batch.target_mask,
    )
    if 0 not in grad_views:
        terms.loss_sum = view_loss_sum(hs[0], views[0], batch, lm_loss)
    return terms


def view_loss_sum(hidden: Tensor, view: HeadView, batch: Encoded, lm_loss: str) -> Tensor:
    """(B,) summed next-token loss of the scored positions under the head `view`."""
    device = view.weight.device
    scored = scored_positions(batch.attention_mask, lm_loss, batch.target_mask).to(device)
    doc, pos = torch.nonzero(scored, as_tuple=True)
    logits = F.linear(hidden.to(device)[doc, pos].float(), view.weight, view.bias)
    loss = F.cross_entropy(logits, batch.input_ids.to(device)[doc, pos + 1], reduction="none")
    return torch.zeros(scored.shape[0], device=device).index_add_(0, doc, loss)


def lm_losses(
    loaded: LoadedModel,
    encoded: Encoded,
    *,
    lm_loss: str = "full",
    cache_root: Path | None = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """(N,) each document's mean next-token loss under `loaded` (NaN without a scored token).

    The base model's side of the language-modelling loss drop (the reference-model membership
    score). It reads the hidden states cache the head gradients use (a head-only finetune's base
    shares the finetuned model's), and caches its own per-chunk results the same way.
    """
    scored_positions(encoded.attention_mask[:1], lm_loss)  # validates the mode
    cache = None
    if cache_root is not None:
        key = cache_key(
            next(loaded.model.parameters()).device,
            weights=loaded.fingerprint,
            inputs=encoded_fingerprint(encoded),
            dtype=str(dtype),
            lm_loss=lm_loss,
            rows=len(encoded),
        )
        cache = ChunkCache(Path(cache_root), "lm-losses", key)
    source = HiddenStates(loaded, encoded, cache_root=cache_root, dtype=dtype, desc="hidden states")
    view = head_view(loaded)

    @torch.no_grad()
    def chunk(rows: range) -> dict[str, Tensor]:
        hidden = source.chunk(rows)  # (rows, T, d)
        sums, tokens = [], []
        for s in range(0, len(rows), batch_size):
            batch = encoded.subset(slice(rows.start + s, min(rows.start + s + batch_size, rows.stop)))
            sums.append(view_loss_sum(hidden[s : s + batch_size], view, batch, lm_loss).cpu())
            tokens.append(scored_positions(batch.attention_mask, lm_loss, batch.target_mask).sum(1))
        total, count = torch.cat(sums), torch.cat(tokens)
        return {"losses": (total / count.clamp_min(1)).masked_fill(count == 0, math.nan)}

    bar = tqdm(total=len(encoded), desc="LM losses", unit="doc", disable=not progress or len(encoded) < 256)
    return gather_chunks(cache, len(encoded), chunk, bar)["losses"]
