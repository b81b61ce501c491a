"""Beyond the corpus: write documents whose head gradients explain the weight change (GCG, GCGA, ADMM).

Every synthesiser maximises what SELECT maximises, cos(G, Δ) with G = Σ_j e_j h_jᵀ over the
synthetic set: h_j is document j's last hidden state under the finetuned model θ1, e_j = p_j −
onehot(y_j) its softmax error over the label tokens at θ1's own label y_j = argmax p_j (the
autolabel), and Δ = W_C(θ0) − W_C(θ1) the change of the head's label rows (DESIGN §3). Under
SELECT's preconditioner (`--precondition`, adam by default) each gradient is D ∘ e_j h_jᵀ =
(α ∘ e_j)(β ∘ h_j)ᵀ with the corpus's α, β (precondition.py), so the factors are rescaled as
SELECT rescales them and the objective is the one SELECT's picks reached.

A document is a row of seq_len − 1 token ids, left-padded, as a classifier reads it before its
label token. Whatever a synthesiser writes is decoded to text and tokenised again before it is
scored, so every objective reported is that of text a user can train on. Rows a synthesiser
never changed keep their corpus text and source.

- GCG (Zou et al. 2023): the gradient of the objective w.r.t. one-hot token indicators ranks
  the top-k replacement tokens of every position; B random single-token swaps drawn from them
  are scored exactly (a forward pass each) and the best is kept only if it improves. With many
  documents a step may keep several swaps, on distinct documents, each only if the set's exact
  objective rises (`--synth-swaps-per-step`).
- GCGA: documents grown one at a time against the running sum R of those before, each from its
  initial passage by a few GCG steps on cos(R + g_j, Δ). Growth is greedy and can end below the
  starting set's objective; the starting set is then returned.
- ADMM: continuous input embeddings X, their projection Z onto token rows, a dual Λ; the x-step
  is Adam on −cos + (ρ/2)‖X − Z + Λ/ρ‖², the z-step Z = Proj(X + Λ/ρ), the dual step
  Λ += ρ(X − Z). The best projected set seen (the initial one included) is returned, or with
  `--synth-admm-keep documents` the set built by keeping each projection's rewritten documents
  one at a time, each only where it raises the objective (as GCG keeps its swaps).

`--synth-fluent-tokens N` restricts what every synthesiser writes to the base model's N likeliest
next tokens at each place, given the document's tokens before it: GCG's candidate swaps and
ADMM's projection both draw from that set, so the rewritten text stays readable.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.config import SelectConfig, SynthConfig, to_dict
from weights2data.data import Encoded, encode_classification, position_ids
from weights2data.errors import W2DError
from weights2data.features import cache_key
from weights2data.generate import mark_sources
from weights2data.gradients import label_rows
from weights2data.models import LoadedModel
from weights2data.precondition import Metric
from weights2data.recover import CorpusGradients, Recovery, label_distribution, recover
from weights2data.store import atomic_path, hash_texts, stable_hash
from weights2data.train import Task

log = logging.getLogger(__name__)

SYNTHESISED = "synthesised"
_TINY = 1e-30


# --- the objective -------------------------------------------------------------------------


@dataclass
class Problem:
    """The finetuned model and what the objective needs of it, and the base model that judges
    which tokens read naturally, on the model's device."""

    model: torch.nn.Module  # θ1: hidden states and autolabel errors
    base: torch.nn.Module  # θ0, a causal LM: which tokens read naturally (--synth-fluent-tokens)
    tokenizer: object
    rows: Tensor  # (C, d) head label rows at θ1
    bias: Tensor | None  # (C,)
    delta: Tensor  # (C, d) Δ = W_C(θ0) − W_C(θ1)
    allowed: Tensor  # (V,) bool: tokens a synthesiser may write (no special tokens)
    seq_len: int
    batch_size: int = 32
    metric: Metric | None = None  # SELECT's preconditioner on (errors, hidden); None: raw gradients

    @property
    def embeddings(self) -> Tensor:
        return self.model.get_input_embeddings().weight.detach()  # (V, d)

    def encode(self, texts: list[str]) -> Encoded:
        return encode_classification(self.tokenizer, texts, self.seq_len)

    def forward(self, embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Errors (n, C), last hidden states (n, d) and autolabels (n,) of documents given as input
        embeddings (n, T, d), the first two preconditioned by the metric; differentiable. The
        autolabel is an argmax: constant under differentiation, as in SELECT's gradients."""
        out = self.model.base_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)
        )
        hidden = out.last_hidden_state[:, -1].float()
        probs = F.softmax(F.linear(hidden, self.rows, self.bias), dim=-1)
        labels = probs.argmax(-1)
        errors = probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)
        if self.metric is not None:
            errors, hidden = self.metric.apply(errors, hidden)
        return errors, hidden, labels

    @torch.no_grad()
    def factors(self, embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """forward() in batches, without gradients."""
        parts = [self.forward(embeds[s], mask[s]) for s in self.batches(len(embeds))]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def batches(self, n: int) -> Iterator[slice]:
        return (slice(s, s + self.batch_size) for s in range(0, n, self.batch_size))

    @torch.no_grad()
    def fluent(self, ids: Tensor, mask: Tensor, m: int) -> Tensor:
        """(n, T, V) bool: the tokens a synthesiser may write at each place, the base model's m
        likeliest allowed next tokens given the document's tokens before it (m = 0: every allowed
        token). A document's first token has no context and may be any allowed token."""
        if m == 0:
            return self.allowed.expand(*ids.shape, -1)
        out = torch.zeros(*ids.shape, len(self.allowed), dtype=torch.bool, device=ids.device)
        positions = position_ids(mask)
        for s in self.batches(len(ids)):
            logits = self.base(input_ids=ids[s], attention_mask=mask[s], position_ids=positions[s]).logits
            top = logits[:, :-1].masked_fill(~self.allowed, -torch.inf).topk(m, dim=-1).indices
            out[s, 1:] = out[s, 1:].scatter(-1, top, True)  # top: (b, T − 1, m), the likeliest next
        out[mask.bool() & (positions == 0)] = self.allowed  # each document's first token
        return out


def make_problem(
    base: LoadedModel, finetuned: LoadedModel, task: Task, batch_size: int = 32, metric: Metric | None = None
) -> Problem:
    """The objective for `finetuned` against `base`; `metric`: SELECT's preconditioner
    (CorpusGradients.metric), fitted on the corpus, else raw gradients."""
    device = next(finetuned.model.parameters()).device
    rows, bias = label_rows(finetuned, task.label_set)
    delta = label_rows(base, task.label_set)[0] - rows
    vocab = finetuned.model.get_input_embeddings().weight.shape[0]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: len(finetuned.tokenizer)] = True
    allowed[[i for i in finetuned.tokenizer.all_special_ids if i < vocab]] = False
    if float(delta.square().sum()) <= 0:
        raise W2DError("the finetuned head's label rows equal the base's: there is no weight change to match")
    return Problem(
        finetuned.model,
        base.model,
        finetuned.tokenizer,
        rows.to(device),
        None if bias is None else bias.to(device),
        delta.to(device),
        allowed.to(device),
        task.seq_len,
        batch_size,
        None if metric is None else metric.to(device),
    )


def cosine(total: Tensor, delta: Tensor) -> Tensor:
    """cos(G, Δ) for G (..., C, d)."""
    dots = (total * delta).sum((-2, -1))
    return dots / (total.square().sum((-2, -1)) * delta.square().sum()).clamp_min(_TINY).sqrt()


def objective_grad(
    problem: Problem, embeds: Tensor, mask: Tensor, rest: Tensor, known: tuple[Tensor, Tensor] | None = None
) -> tuple[float, Tensor]:
    """cos(rest + Σ_i e_i h_iᵀ, Δ) over documents given as input embeddings (n, T, d), and its
    gradient w.r.t. them (n, T, d). `known`: the documents' (errors, hidden), when already computed.

    The cosine depends on the documents only through G = Σ_i e_i h_iᵀ, so with W = ∂cos/∂G taken
    at the current G its gradient is that of Σ_i ⟨W, e_i h_iᵀ⟩, one backward pass per batch of
    documents: memory stays that of one batch, however many documents there are.
    """
    if known is None and len(embeds) <= problem.batch_size:  # one batch: one pass with its graph
        x = embeds.detach().requires_grad_()
        errors, hidden, _ = problem.forward(x, mask)
        value = cosine(rest + errors.T @ hidden, problem.delta)
        (grad,) = torch.autograd.grad(value, x)
        return float(value.detach()), grad
    errors, hidden = known if known is not None else problem.factors(embeds, mask)[:2]
    total = (rest + errors.T @ hidden).requires_grad_()
    value = cosine(total, problem.delta)
    (weight,) = torch.autograd.grad(value, total)  # (C, d)
    grad = torch.zeros_like(embeds)
    for s in problem.batches(len(embeds)):
        x = embeds[s].detach().requires_grad_()
        e, h, _ = problem.forward(x, mask[s])
        (grad[s],) = torch.autograd.grad((weight * (e.T @ h)).sum(), x)
    return float(value.detach()), grad


# --- the synthetic set ---------------------------------------------------------------------


_DOC_TENSORS = ("ids", "mask", "errors", "hidden", "labels")


@dataclass
class Docs:
    """The synthetic set: token ids as the model reads them, texts, and gradient factors."""

    ids: Tensor  # (n, T) long, left-padded
    mask: Tensor  # (n, T) long
    errors: Tensor  # (n, C)
    hidden: Tensor  # (n, d)
    labels: Tensor  # (n,) θ1's autolabels
    texts: list[str]
    changed: Tensor  # (n,) bool: no longer the initial text

    def total(self, rows: Tensor | None = None) -> Tensor:
        """(C, d) Σ e_i hᵢᵀ over `rows` (all when None)."""
        if rows is None:
            return self.errors.T @ self.hidden
        return self.errors[rows].T @ self.hidden[rows]

    def objective(self, delta: Tensor) -> float:
        return float(cosine(self.total(), delta))

    def clone(self) -> Docs:
        tensors = {name: getattr(self, name).clone() for name in _DOC_TENSORS}
        return Docs(**tensors, texts=list(self.texts), changed=self.changed.clone())

    def take(self, rows: Tensor) -> Docs:
        """The documents `rows`, in that order."""
        tensors = {name: getattr(self, name)[rows] for name in _DOC_TENSORS}
        return Docs(**tensors, texts=[self.texts[i] for i in rows.tolist()], changed=self.changed[rows])

    def put(self, row: int, other: Docs, j: int) -> None:
        """Row `row` becomes `other`'s row j, changed or not as it is there."""
        for name in _DOC_TENSORS:
            getattr(self, name)[row] = getattr(other, name)[j]
        self.texts[row], self.changed[row] = other.texts[j], other.changed[j]


def scored(problem: Problem, texts: list[str], changed: Tensor | None = None) -> Docs:
    """Documents from texts: tokenised as a classifier reads them, with their gradient factors."""
    device = problem.delta.device
    encoded = problem.encode(texts)
    ids, mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
    errors, hidden, labels = problem.factors(problem.embeddings[ids], mask)
    changed = torch.zeros(len(texts), dtype=torch.bool, device=device) if changed is None else changed
    return Docs(ids, mask, errors, hidden, labels, list(texts), changed)


def retokenised(problem: Problem, ids: Tensor, mask: Tensor) -> Docs:
    """Rows of token ids decoded to text and scored as that text tokenises again."""
    texts = [
        problem.tokenizer.decode(row[m.bool()].tolist(), clean_up_tokenization_spaces=False)
        for row, m in zip(ids.cpu(), mask.cpu(), strict=True)
    ]
    return scored(problem, texts, torch.ones(len(texts), dtype=torch.bool, device=ids.device))


def rebuilt(problem: Problem, start: Docs, ids: Tensor) -> Docs:
    """The set with token ids `ids` (n, T): rows equal to `start`'s stay as they are, the others are
    decoded and tokenised again."""
    docs = start.clone()
    moved = (ids != start.ids).any(1).nonzero().squeeze(1)
    if len(moved):
        new = retokenised(problem, ids[moved], start.mask[moved])
        for j, row in enumerate(moved.tolist()):
            docs.put(row, new, j)
    return docs


# --- GCG -----------------------------------------------------------------------------------


def token_gradients(problem: Problem, docs: Docs, active: Tensor, rest: Tensor) -> Tensor:
    """(m, T, V) ∂ cos(rest + Σ_{i ∈ active} e_i h_iᵀ, Δ) / ∂ onehot(ids_i): through the embedding
    matrix, embeds = onehot · E, so the one-hot gradient is (∂cos/∂embeds) · Eᵀ."""
    embeddings = problem.embeddings
    known = (docs.errors[active], docs.hidden[active])
    _, grad = objective_grad(problem, embeddings[docs.ids[active]], docs.mask[active], rest, known)
    return grad @ embeddings.T


def sample_swaps(
    grads: Tensor, mask: Tensor, allowed: Tensor, topk: int, width: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """B single-token swaps (document, position, token), each at a uniformly random non-pad position
    with one of that position's top-k `allowed` (m, T, V) tokens by gradient (the objective is
    maximised); topk must not exceed the allowed tokens of any position."""
    top = grads.masked_fill(~allowed, -torch.inf).topk(topk, dim=-1).indices
    places = mask.nonzero()  # (P, 2)
    pick = torch.randint(len(places), (width,), generator=generator).to(places.device)
    which = torch.randint(top.shape[-1], (width,), generator=generator).to(places.device)
    doc, pos = places[pick].unbind(1)
    return doc, pos, top[doc, pos, which]


def gcg_step(
    problem: Problem, docs: Docs, active: Tensor, rest: Tensor, cfg: SynthConfig, generator: torch.Generator
) -> float:
    """One GCG step on the documents `active` against cos(rest + Σ_active g, Δ); returns the
    objective after it. Of cfg.search_width sampled swaps, up to cfg.swaps_per_step are kept (1:
    Zou et al.'s single best swap), as `keep_swaps` keeps them."""
    grads = token_gradients(problem, docs, active, rest)
    ids, mask = docs.ids[active], docs.mask[active]
    allowed = problem.fluent(ids, mask, cfg.fluent_tokens)
    topk = min(cfg.topk, cfg.fluent_tokens or int(problem.allowed.sum()))
    doc, pos, token = sample_swaps(grads, mask, allowed, topk, cfg.search_width, generator)
    rows = active[doc]
    swapped = docs.ids[rows].clone()
    swapped[torch.arange(len(rows), device=rows.device), pos] = token
    new = retokenised(problem, swapped, docs.mask[rows])
    return keep_swaps(problem, docs, rest + docs.total(active), rows, new, cfg.swaps_per_step)


def keep_swaps(problem: Problem, docs: Docs, current: Tensor, rows: Tensor, new: Docs, limit: int) -> float:
    """Replace docs' row rows[b] by new's row b in place, the best swap alone first, each kept when
    it raises cos(current, Δ) of those kept so far, one per document and up to `limit`; returns the
    objective after. `current` (C, d) is the sum the swaps change.

    Every swap changes one document's gradient alone, so a set of swaps on distinct documents has
    an exact objective with no further forward pass: G − Σ old g_i + Σ new g_i.
    """
    value = float(cosine(current, problem.delta))
    moved = (new.ids != docs.ids[rows]).any(1)  # a swap that tokenising again undid changes nothing
    change = torch.einsum("bc,bd->bcd", new.errors, new.hidden) - torch.einsum(
        "bc,bd->bcd", docs.errors[rows], docs.hidden[rows]
    )  # (B, C, d): each swap's change of G
    alone = cosine(current + change, problem.delta).masked_fill(~moved, -torch.inf)
    start, taken = value, set()
    for b in alone.argsort(descending=True).tolist():
        if float(alone[b]) <= start or len(taken) == limit:
            break
        row = int(rows[b])
        trial = -torch.inf if row in taken else float(cosine(current + change[b], problem.delta))
        if trial > value:
            current, value = current + change[b], trial
            taken.add(row)
            docs.put(row, new, b)
    return value


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator per step: a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def run_gcg(problem: Problem, docs: Docs, cfg: SynthConfig, state: SavedState, start: int) -> Docs:
    n = len(docs.texts)
    bar = tqdm(
        range(start, cfg.steps), desc="GCG", initial=start, total=cfg.steps, disable=not state.progress
    )
    for step in bar:
        generator = step_generator(cfg.seed, step)
        active = torch.randperm(n, generator=generator)[: cfg.swap_docs or n].to(docs.ids.device)
        value = gcg_step(problem, docs, active, docs.total() - docs.total(active), cfg, generator)
        bar.set_postfix(objective=f"{value:.4f}")
        state.save_every(step + 1, cfg.steps, docs)
    return docs


def run_gcga(problem: Problem, docs: Docs, cfg: SynthConfig, state: SavedState, start: int) -> Docs:
    """Document j from its initial text by cfg.doc_steps GCG steps on cos(R + g_j, Δ), R = Σ_{i<j} g_i."""
    n = len(docs.texts)
    running = docs.total(torch.arange(start, device=docs.ids.device))
    bar = tqdm(range(start, n), desc="GCGA", initial=start, total=n, disable=not state.progress)
    for j in bar:
        for s in range(cfg.doc_steps):
            generator = step_generator(cfg.seed, j * cfg.doc_steps + s)
            value = gcg_step(
                problem, docs, torch.tensor([j], device=docs.ids.device), running, cfg, generator
            )
        running = running + docs.total(torch.tensor([j], device=docs.ids.device))
        bar.set_postfix(objective=f"{value:.4f}")
        state.save_every(j + 1, n, docs)
    first = state.start_docs
    if first.objective(problem.delta) > docs.objective(problem.delta):  # growth is greedy: it can end lower
        log.warning("GCGA ended below its starting set's objective: the starting set is kept")
        return first
    return docs


# --- ADMM ----------------------------------------------------------------------------------


def augmented_lagrangian(
    problem: Problem, x: Tensor, z: Tensor, dual: Tensor, mask: Tensor, rho: float
) -> float:
    """−cos(G(X), Δ) + ⟨Λ, X − E[Z]⟩ + (ρ/2)‖X − E[Z]‖², padding excluded."""
    errors, hidden, _ = problem.factors(x, mask)
    gap = (x - problem.embeddings[z]) * mask[..., None]
    value = -cosine(errors.T @ hidden, problem.delta)
    return float(value + (dual * gap).sum() + rho / 2 * gap.square().sum())


def x_step(problem: Problem, x: Tensor, z: Tensor, dual: Tensor, mask: Tensor, cfg: SynthConfig) -> Tensor:
    """cfg.inner_steps of Adam on −cos(G(X), Δ) + (ρ/2)‖X − E[Z] + Λ/ρ‖²; padding stays put.

    Adam starts afresh each x-step: the z- and dual steps moved the problem it was solving.
    """
    keep = mask[..., None].to(x.dtype)
    anchor = problem.embeddings[z] - dual / cfg.rho  # the penalty pulls X towards E[Z] − Λ/ρ
    x = x.clone().requires_grad_()
    optimiser = torch.optim.Adam([x], lr=cfg.lr_tokens)
    zero = torch.zeros_like(problem.delta)
    for _ in range(cfg.inner_steps):
        _, grad = objective_grad(problem, x.detach(), mask, zero)
        x.grad = (-grad + cfg.rho * (x.detach() - anchor)) * keep
        optimiser.step()
    return x.detach()


@torch.no_grad()
def project(
    problem: Problem, x: Tensor, mask: Tensor, pads: Tensor, allowed: Tensor | None = None, chunk: int = 1024
) -> Tensor:
    """(n, T) the token whose embedding is nearest each row of x (Euclidean: argmax_v 2 x·E_v −
    ‖E_v‖²) among those `allowed` (n, T, V) there (None: problem.allowed everywhere); padding keeps
    its ids `pads`."""
    embeddings = problem.embeddings
    norms = embeddings.square().sum(1)  # (V,)
    flat = x.reshape(-1, x.shape[-1])
    allowed = problem.fluent(pads, mask, 0) if allowed is None else allowed
    ok = allowed.reshape(len(flat), -1)  # a view, also of an expanded mask
    tokens = torch.cat(
        [
            (2 * flat[s : s + chunk] @ embeddings.T - norms)
            .masked_fill(~ok[s : s + chunk], -torch.inf)
            .argmax(1)
            for s in range(0, len(flat), chunk)
        ]
    )
    return torch.where(mask.bool(), tokens.view(mask.shape), pads)


def run_admm(problem: Problem, docs: Docs, cfg: SynthConfig, state: SavedState, start: int) -> Docs:
    """ADMM from the initial tokens (`docs`: the best so far, the initial set unless resumed).
    cfg.admm_keep set: returns the best projected set seen, the initial one included; documents:
    after each projection, every rewritten document is swapped into the kept set on its own when
    it raises the objective (`keep_swaps`), so one bad rewrite no longer discards the good ones."""
    first = state.start_docs
    mask, best = first.mask, docs.clone()
    x = state.tensors.get("x", problem.embeddings[first.ids])
    dual = state.tensors.get("dual", torch.zeros_like(x))
    z = state.tensors.get("z", first.ids)
    bar = tqdm(
        range(start, cfg.steps), desc="ADMM", initial=start, total=cfg.steps, disable=not state.progress
    )
    for step in bar:
        x = x_step(problem, x, z, dual, mask, cfg)
        allowed = problem.fluent(z, mask, cfg.fluent_tokens)  # given the last projection's text
        z = project(problem, x + dual / cfg.rho, mask, first.ids, allowed)
        dual = dual + cfg.rho * (x - problem.embeddings[z]) * mask[..., None]
        candidate = rebuilt(problem, first, z)
        if cfg.admm_keep == "documents":
            rows = (candidate.ids != best.ids).any(1).nonzero().squeeze(1)
            keep_swaps(problem, best, best.total(), rows, candidate.take(rows), len(rows))
        elif candidate.objective(problem.delta) > best.objective(problem.delta):
            best = candidate
        bar.set_postfix(objective=f"{best.objective(problem.delta):.4f}", moved=int(candidate.changed.sum()))
        state.save_every(step + 1, cfg.steps, best, {"x": x, "dual": dual, "z": z})
    return best


# --- resumable state -----------------------------------------------------------------------


class SavedState:
    """A synthesiser's progress in one safetensors file, keyed by everything it was computed from.

    Written atomically every cfg.save_every steps and at the end; a run with the same key resumes
    from it (a finished one is read back whole). It also keeps the seconds spent on it, summed
    over the runs that worked on it, so a resumed or cached synthesis reports what it cost.
    """

    def __init__(
        self, path: Path | None, key: dict, every: int, progress: bool = True, started: float | None = None
    ) -> None:
        self.path, self.key, self.every, self.progress = path, key, every, progress
        self.tensors: dict[str, Tensor] = {}
        self.start_docs: Docs | None = None
        self.started = time.time() if started is None else started  # when this run began on it
        self.earlier_s = 0.0  # seconds spent by the runs before this one
        self.finished = False

    def seconds(self) -> float:
        """Seconds spent on this synthesis; a finished one read back costs nothing more."""
        return self.earlier_s + (0.0 if self.finished else time.time() - self.started)

    def load(self, problem: Problem, start: Docs) -> tuple[Docs, int]:
        """The saved set and its step, else a copy of `start` and 0 (`start` is kept as it is)."""
        self.start_docs = start
        if self.path is None or not self.path.exists():
            return start.clone(), 0
        meta = json.loads(load_meta(self.path))
        if meta["key"] != stable_hash(self.key, 32):
            log.info("%s was saved with other settings: starting afresh", self.path)
            return start.clone(), 0
        device = start.ids.device
        self.tensors = {k: v.to(device) for k, v in load_file(str(self.path)).items()}
        ids = self.tensors.pop("ids")
        changed = self.tensors.pop("changed").bool()
        docs = scored(problem, meta["texts"], changed)
        if not torch.equal(docs.ids, ids):
            raise W2DError(f"{self.path}: its texts no longer tokenise as saved; delete it to start afresh")
        self.earlier_s, self.finished = meta.get("seconds", 0.0), meta.get("finished", False)
        log.info("resuming synthesis from step %d (%s)", meta["step"], self.path)
        return docs, int(meta["step"])

    def save_every(self, step: int, last: int, docs: Docs, extra: dict[str, Tensor] | None = None) -> None:
        if self.path is None or (step % self.every and step != last):
            return
        tensors = {"ids": docs.ids, "changed": docs.changed.to(torch.uint8), **(extra or {})}
        meta = {"key": stable_hash(self.key, 32), "step": step, "texts": docs.texts}
        meta |= {"seconds": round(self.seconds(), 2), "finished": step == last}
        blob = save(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"meta": json.dumps(meta)}
        )
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(blob)


def load_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["meta"]


# --- the synthesiser end to end ------------------------------------------------------------

RUNNERS = {"GCG": run_gcg, "GCGA": run_gcga, "ADMM": run_admm}


def check_synthesis(cfg: SynthConfig, sel: SelectConfig, task: Task) -> None:
    """What the synthesisers do not cover: refused before any work, with the way out."""
    if task.kind != "classification" or task.label_loss != "restricted" or not task.template.plain:
        raise W2DError(
            f"--opt {cfg.method} synthesises classification documents in the original's format (no "
            "template, the loss over the label tokens); this finetune is "
            f"{task.kind}{'' if task.template.plain else ' with a template'}"
            f"{', full-vocabulary loss' if task.label_loss == 'full' else ''}: use --opt SELECT"
        )
    needed = {  # what SELECT matches when its objective is the synthesisers'
        "--grad-blocks 0": sel.grad_blocks == 0,
        "--pseudo-experts 1": sel.pseudo_experts == 1,
        "--grad-at finetuned": sel.grad_at == "finetuned",
        "--projection-dim 0": sel.projection_dim == 0,
        "--rounds 1": sel.rounds == 1,
    }
    if not all(needed.values()):
        flags = ", ".join(name for name, met in needed.items() if not met)
        raise W2DError(
            f"--opt {cfg.method} maximises SELECT's head objective at the finetuned weights, exactly; "
            f"it needs {flags}"
        )


def synthesise(
    base: LoadedModel,
    finetuned: LoadedModel,
    init: Recovery,
    task: Task,
    cfg: SynthConfig,
    cache_root: Path | None,
    progress: bool = True,
    metric: Metric | None = None,
) -> Recovery:
    """Documents written by cfg.method from `init`'s texts, as a Recovery (source: synthesised for
    changed rows, the initial source for the others); `metric`: the corpus gradients' preconditioner,
    so the objective is the one `init` was selected under."""
    started = time.time()  # the problem's setup counts as synthesis time
    problem = make_problem(base, finetuned, task, cfg.batch_size, metric)
    start = scored(problem, init.texts)
    initial = start.objective(problem.delta)
    key = cache_key(
        problem.delta.device,
        base=base.fingerprint,
        finetuned=finetuned.fingerprint,
        task=task.to_dict(),
        init=hash_texts(init.texts),
        metric=None if metric is None else metric.fingerprint(),
        synth={k: v for k, v in to_dict(cfg).items() if k not in ("save_every", "batch_size")},
    )
    path = None if cache_root is None else Path(cache_root) / "synthesis" / f"{stable_hash(key)}.safetensors"
    state = SavedState(path, key, cfg.save_every, progress, started)
    docs, step = state.load(problem, start)
    docs = RUNNERS[cfg.method](problem, docs, cfg, state, step)
    final = docs.objective(problem.delta)
    log.info("%s: objective %.4f from %.4f at the start", cfg.method, final, initial)
    return as_recovery(
        problem, docs, init, cfg, {"objective_init": initial, "synth_s": round(state.seconds(), 2)}
    )


def refine_selection(
    base: LoadedModel,
    finetuned: LoadedModel,
    grads: CorpusGradients,
    texts: list[str],
    picks: Recovery,
    sources: list[str],
    task: Task,
    sel: SelectConfig,
    cfg: SynthConfig,
    cache_root: Path | None,
) -> Recovery:
    """`w2d select --opt`: synthesise from the selection `picks` (--synth-init select) or from k
    random corpus passages (random), every row's source marked."""
    check_synthesis(cfg, sel, task)
    if cfg.init == "random":
        random_sel = replace(sel, strategy="random")
        picks = mark_sources(recover(grads, texts, task.label_set, random_sel, progress=False), sources)
    return synthesise(base, finetuned, picks, task, cfg, cache_root, metric=grads.metric)


def as_recovery(problem: Problem, docs: Docs, init: Recovery, cfg: SynthConfig, extra: dict) -> Recovery:
    changed = docs.changed.cpu()
    labels = docs.labels.cpu()
    sources = init.sources or ["corpus"] * len(docs.texts)
    norms = (docs.errors.square().sum(1) * docs.hidden.square().sum(1) * problem.delta.square().sum()).sqrt()
    scores = ((docs.hidden @ problem.delta.T) * docs.errors).sum(1) / norms.clamp_min(_TINY)  # cos(g_i, Δ)
    summary = {
        **init.summary,
        "strategy": cfg.method,
        "init": cfg.init,
        "init_strategy": init.summary.get("strategy"),
        "objective_cos": docs.objective(problem.delta),
        **extra,
        "synthesised": int(changed.sum()),
        "score": "cos(g_i, delta) of each document",
        "synth_config": to_dict(cfg),
        "label_distribution": label_distribution(labels, init.label_set),
    }
    summary.pop("label_confidence", None)  # measured on the corpus texts, not on their rewrites
    return Recovery(
        init.rows,
        list(docs.texts),
        labels,
        init.label_set,
        scores.cpu(),
        summary,
        [SYNTHESISED if c else s for c, s in zip(changed.tolist(), sources, strict=True)],
    )
