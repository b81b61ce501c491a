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
(N,) terms, never the (N, T, d) hidden states.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.config import GRAD_AT
from weights2data.data import Encoded, scored_positions
from weights2data.errors import W2DError
from weights2data.features import encoded_fingerprint, hidden_chunks
from weights2data.models import LoadedModel
from weights2data.selection import DenseFeatures
from weights2data.store import atomic_path, stable_hash

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
    delta: Tensor,
    sketch: KroneckerSketch,
    mode: str = "full",
    combined: Tensor | None = None,
) -> BatchTerms:
    """Exact ⟨g, Δ⟩ and ‖g‖², the sketch Φ(g) and the loss, for a batch of documents.

    hiddens[m] (B, T, d) are the final hidden states read by views[m]; the gradient is the sum
    over all views (one view: gradients at one model; two: the `both` option). The loss is the
    first view's. Per scored position: one head matmul for the logits, then one matmul of the
    softmax errors against [Δ | R_e] (V × (d + a); pass it as `combined` to build it once)
    giving both Δᵀ e_t (so e_tᵀ Δ h_t = (Δᵀ e_t)·h_t) and R_eᵀ e_t.
    """
    device = sketch.r_e.device
    scored = scored_positions(attention_mask, mode).to(device)
    doc, pos = torch.nonzero(scored, as_tuple=True)  # row-major: each document's positions contiguous
    targets = input_ids.to(device)[doc, pos + 1]
    n_docs, d = scored.shape[0], delta.shape[1]
    if combined is None:
        combined = torch.cat([delta, sketch.r_e], dim=1)
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
        z = e @ combined  # (M, d + a): Δᵀ e_t | R_eᵀ e_t
        dots.append(torch.linalg.vecdot(z[:, :d], h))  # (M,) e_tᵀ Δ h_t
        projected.append(z[:, d:])
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


# ---------------------------------------------------------------- streaming hidden states


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


def head_delta(base: LoadedModel, finetuned: LoadedModel) -> Tensor:
    """Δ = W_head(base) − W_head(finetuned), (V, d); for tied models the embedding difference."""
    wb = base.model.get_output_embeddings().weight.detach().float()
    wf = finetuned.model.get_output_embeddings().weight.detach().float()
    if wb.shape != wf.shape:
        raise W2DError(f"the heads differ in shape: base {tuple(wb.shape)} vs finetuned {tuple(wf.shape)}")
    return wb.to(wf.device) - wf


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
    With `cache_root`, the result is stored under it keyed by both models' weights, the inputs
    and the sketch: the vocabulary-sized head pass over a corpus runs once, like its forward pass.
    """
    if grad_at not in GRAD_AT:
        raise W2DError(f"unknown --grad-at '{grad_at}': choose from {', '.join(GRAD_AT)}")
    scored_positions(encoded.attention_mask[:1], lm_loss)  # validates the mode
    if cache_root is not None:
        key = {
            "base": base.fingerprint,
            "finetuned": finetuned.fingerprint,
            "inputs": encoded_fingerprint(encoded),
            "dtype": str(dtype),
            "settings": [lm_loss, grad_at, dim, projection, seed, None if factors is None else list(factors)],
        }
        saved = Path(cache_root) / "lm-features" / f"{stable_hash(key, 20)}.safetensors"
        if saved.exists():
            log.info("reusing the LM head gradients in %s", saved)
            return _load(saved, key)
    started = time.time()
    device = next(finetuned.model.parameters()).device
    delta = head_delta(base, finetuned).to(device)
    vocab, d = delta.shape
    sketch = KroneckerSketch(vocab, d, dim, seed, projection, factors).to(device)
    # the finetuned view comes first: it gives the loss; in `base` mode it contributes no gradient
    names = ["finetuned", "base"] if grad_at != "finetuned" else ["finetuned"]
    models = {"finetuned": finetuned, "base": base}
    views = [head_view(models[n]) for n in names]
    combined = torch.cat([delta, sketch.r_e], dim=1)  # (V, d + a), shared by every view
    grad_views = [i for i, n in enumerate(names) if grad_at in (n, "both")]
    streams = {}
    for n in names:
        same_body = n == "base" and base.body_fingerprint == finetuned.body_fingerprint
        streams[n] = (
            None
            if same_body
            else hidden_chunks(
                models[n], encoded, cache_root=cache_root, dtype=dtype, desc=f"{n} hidden states"
            )
        )
    n_docs = len(encoded)
    out_sketch = torch.empty(n_docs, dim)
    target_dots, sq_norms = torch.empty(n_docs), torch.empty(n_docs)
    losses, tokens = torch.empty(n_docs), torch.empty(n_docs, dtype=torch.long)
    hidden_s = head_s = 0.0
    done = 0
    bar = tqdm(total=n_docs, desc="LM head gradients", unit="doc", disable=not progress or n_docs < 256)
    while done < n_docs:
        tick = time.time()
        chunk = {n: next(s) for n, s in streams.items() if s is not None}
        if "base" in names and streams["base"] is None:
            chunk["base"] = chunk["finetuned"]
        rows = next(iter(chunk.values())).shape[0]
        tock = time.time()
        hidden_s += tock - tick
        for s in range(0, rows, batch_size):
            sl = slice(done + s, done + min(s + batch_size, rows))
            batch = encoded.subset(sl)
            hs = [chunk[n][s : s + batch_size] for n in names]
            # loss from the finetuned view; gradient from grad_views
            if grad_views == [0]:
                terms = batch_terms(
                    hs, views, batch.input_ids, batch.attention_mask, delta, sketch, lm_loss, combined
                )
            else:
                terms = _terms_with_loss_view(hs, views, combined, grad_views, batch, delta, sketch, lm_loss)
            out_sketch[sl] = terms.sketch.cpu()
            target_dots[sl], sq_norms[sl] = terms.target_dots.cpu(), terms.sq_norms.cpu()
            tokens[sl] = terms.tokens.cpu()
            losses[sl] = (terms.loss_sum.cpu() / terms.tokens.cpu().clamp_min(1)).masked_fill(
                terms.tokens.cpu() == 0, math.nan
            )
        head_s += time.time() - tock
        done += rows
        bar.update(rows)
    bar.close()
    features = DenseFeatures(
        out_sketch, sketch.matrix(delta).cpu(), target_dots=target_dots, sq_norms=sq_norms
    )
    features.delta_sq_norm = float(delta.double().square().sum())  # exact, not the sketched norm
    empty = int((tokens == 0).sum())
    if empty:
        log.warning(
            "%d corpus documents have fewer than 2 tokens: zero gradient, never selected first", empty
        )
    timings = {
        "hidden_states_s": round(hidden_s, 2),
        "head_gradients_s": round(head_s, 2),
        "features_s": round(time.time() - started, 2),
        "sketch": f"{sketch.factors[0]}x{sketch.factors[1]}",
    }
    out = LMFeatures(features, losses, tokens, timings)
    if cache_root is not None:
        _save(out, saved, key)
    return out


def _save(out: LMFeatures, path: Path, key: dict) -> None:
    f = out.features
    tensors = {
        "grads": f.grads,
        "delta": f.delta,
        "target_dots": f.target_dots,
        "sq_norms": f.sq_norms,
        "losses": out.losses,
        "tokens": out.tokens,
    }
    meta = {
        "key": json.dumps(key),
        "delta_sq_norm": repr(f.delta_sq_norm),
        "timings": json.dumps(out.timings),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _load(path: Path, key: dict) -> LMFeatures:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if json.loads(meta["key"]) != key:
            raise W2DError(f"LM feature cache {path} does not match its key; delete the file")
        t = {name: f.get_tensor(name) for name in f.keys()}
    features = DenseFeatures(t["grads"], t["delta"], target_dots=t["target_dots"], sq_norms=t["sq_norms"])
    features.delta_sq_norm = float(meta["delta_sq_norm"])
    timings = {**json.loads(meta["timings"]), "cached": True}
    return LMFeatures(features, t["losses"], t["tokens"], timings)


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
    )
    if 0 not in grad_views:
        terms.loss_sum = finetuned_loss_sum(hs[0], views[0], batch, lm_loss)
    return terms


def finetuned_loss_sum(hidden: Tensor, view: HeadView, batch: Encoded, lm_loss: str) -> Tensor:
    """(B,) summed next-token loss of the scored positions."""
    device = view.weight.device
    scored = scored_positions(batch.attention_mask, lm_loss).to(device)
    doc, pos = torch.nonzero(scored, as_tuple=True)
    logits = F.linear(hidden.to(device)[doc, pos].float(), view.weight, view.bias)
    loss = F.cross_entropy(logits, batch.input_ids.to(device)[doc, pos + 1], reduction="none")
    return torch.zeros(scored.shape[0], device=device).index_add_(0, doc, loss)
