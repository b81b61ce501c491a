"""Contrastive candidate generation: in-domain documents sampled from the finetuned model against the base.

SELECT can only return what the corpus holds (Wikipedia passages for a news classifier). Here
the finetuned model θ1 writes candidates itself, each next token drawn from
logit(θ1) − α · logit(θ0): what the finetune made more likely than the base already found it,
the idea of contrastive decoding (Li et al. 2023) and of CDD (Brzozowski et al. 2026), which
recovers finetuning data this way from vague openings. The texts are appended to the corpus
and re-tokenised, labelled and scored there like any corpus document.

Classifiers: the original's format puts the label token after the text, so the label cannot
lead the sampling without a template the expert never saw. Documents are generated
unconditionally and θ1 labels them (autolabels), as it labels corpus documents; `per_label`
conditions on the label by rejection instead (`generate_per_label`): drawn round after round,
a document is kept only while θ1's label for it has room left in that label's equal share.
A classifier's loss touched only the label position, so its contrast on ordinary text may be
weak (four samples from a top:4 AG News SmolLM2 classifier read as web and code text, not
news); language-modelling finetunes are where the contrast is expected to carry the data.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from weights2data.config import GenerateConfig, to_dict
from weights2data.data import Split
from weights2data.errors import W2DError
from weights2data.models import LoadedModel
from weights2data.store import atomic_path, read_json, stable_hash, write_json

if TYPE_CHECKING:
    from weights2data.recover import Recovery

log = logging.getLogger(__name__)

CORPUS, GENERATED = "corpus", "generated"
# Generic openings, neutral across news, reviews and encyclopedic text: the contrast, not the
# opening, should steer. No BOS token: weights2data encodes every text without special tokens,
# so a document is generated in the form it is later scored in.
OPENINGS = ("The", "A", "In", "It", "This", "I", "On", "After")

Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Labeller:
    """The finetuned model's label for generated texts, for generation conditioned on the label."""

    label: Callable[[list[str]], torch.Tensor]  # texts → (N,) label ids in [0, num_labels)
    num_labels: int
    key: str  # what decides the labels besides the two models' weights (label tokens, template)


def contrastive_logits(tuned: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """logit(θ1) − α · logit(θ0), (B, V). Raw logits or log-probabilities give the same
    distribution: they differ by a constant per row.

    α = 0.5 by default: α = 1 samples the pure likelihood ratio p1 / p0, which rewards any token
    the base finds rarer than the finetune does, rare junk included; 0.5 keeps half of θ1's own
    preference while still favouring what the finetune added.
    """
    return tuned - alpha * base


def next_tokens(
    tuned: torch.Tensor, base: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator
) -> torch.Tensor:
    """(B,) tokens sampled from the contrasted distribution, filtered by plausibility and top-p.

    The plausibility constraint keeps tokens with p1 ≥ β · max p1. It is needed: with α < 1 the
    contrast is p1 · p0^-α, which lifts the whole long tail of the vocabulary above θ1's few
    sensible tokens.
    """
    logits = contrastive_logits(tuned, base, cfg.alpha) / cfg.temperature
    if cfg.plausibility > 0:
        floor = tuned.max(-1, keepdim=True).values + math.log(cfg.plausibility)
        logits = logits.masked_fill(tuned < floor, -math.inf)
    if cfg.top_p < 1:
        logits = nucleus(logits, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask all but the smallest set of most likely tokens whose probability reaches top_p."""
    ordered, order = logits.sort(-1, descending=True)
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    return logits.scatter(-1, order, ordered.masked_fill(before >= top_p, -math.inf))


def forward(model: torch.nn.Module, ids: torch.Tensor, cache: object) -> tuple[torch.Tensor, object]:
    """Last-position logits (B, V) float32 and the grown KV cache (the keyword is `cache` from
    transformers 5, `past_key_values` before)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    return out.logits[:, -1].float(), getattr(out, key)


@torch.inference_mode()
def decode(
    base: LoadedModel,
    finetuned: LoadedModel,
    prefix: torch.Tensor,
    steps: int,
    pick: Pick,
    stop: torch.Tensor,
) -> torch.Tensor:
    """(B, P + ≤ steps) ids: `prefix` (B, P) extended one token a step, both models in lockstep.

    Each step both models read only the tokens just added, attending to their own KV caches;
    `pick(logits of θ1, logits of θ0)` returns the next tokens. Stops early once every row has
    emitted a token in `stop`.
    """
    ids, new, caches = prefix, prefix, [None, None]
    done = torch.zeros(len(prefix), dtype=torch.bool, device=prefix.device)
    for _ in range(steps):
        tuned, caches[0] = forward(finetuned.model, new, caches[0])
        ref, caches[1] = forward(base.model, new, caches[1])
        new = pick(tuned, ref).unsqueeze(1)
        ids = torch.cat([ids, new], 1)
        done |= torch.isin(new[:, 0], stop)
        if done.all():
            break
    return ids


def openings(spec: str | None) -> list[str]:
    """--prefixes: None for the built-in list, a file with one opening per line, or a comma list."""
    if spec is None:
        return list(OPENINGS)
    if "," not in spec and ("/" in spec or spec.endswith(".txt")) and not Path(spec).is_file():
        raise W2DError(f"--prefixes {spec}: no such file (to use it as the one opening, end it with a comma)")
    try:
        lines = Path(spec).read_text().splitlines() if Path(spec).is_file() else spec.split(",")
    except (OSError, UnicodeDecodeError) as exc:
        raise W2DError(f"--prefixes {spec}: could not read the file: {exc}") from exc
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise W2DError(f"--prefixes {spec!r} names no opening")
    return found


def generate(
    base: LoadedModel, finetuned: LoadedModel, cfg: GenerateConfig, seq_len: int, progress: bool = True
) -> list[str]:
    """`cfg.docs` texts of up to `seq_len` tokens each, the opening included (kept: it is part of
    the text). Documents sharing an opening are batched, so no row needs padding. Deterministic
    for a seed, a batch size and a device."""
    tokenizer = finetuned.tokenizer
    starts = openings(cfg.prefixes)
    prefixes = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in starts]
    for text, ids in zip(starts, prefixes, strict=True):
        if not 1 <= len(ids) < seq_len:
            raise W2DError(f"opening {text!r} has {len(ids)} tokens: it must leave room in {seq_len}")
    if base.fingerprint == finetuned.fingerprint:
        raise W2DError(
            "the finetuned weights equal the base weights: contrasting a model with itself samples it "
            "alone; pass the finetuned model as --finetuned"
        )
    drawn = np.random.default_rng(cfg.seed).integers(len(starts), size=cfg.docs)
    device = next(finetuned.model.parameters()).device
    pick = partial(next_tokens, cfg=cfg, generator=torch.Generator(device=device).manual_seed(cfg.seed))
    specials = set(tokenizer.all_special_ids)
    stop = torch.tensor(sorted(specials), device=device)
    texts = [""] * cfg.docs
    with tqdm(total=cfg.docs, desc="generating", unit="doc", disable=not progress) as bar:
        for o, prefix in enumerate(prefixes):
            rows = np.flatnonzero(drawn == o)
            for first in range(0, len(rows), cfg.batch_size):
                batch = rows[first : first + cfg.batch_size]
                start = torch.tensor([prefix] * len(batch), device=device)
                ids = decode(base, finetuned, start, seq_len - len(prefix), pick, stop)
                for row, seq in zip(batch.tolist(), ids.tolist(), strict=True):
                    end = next((i for i, t in enumerate(seq) if t in specials), len(seq))
                    texts[row] = tokenizer.decode(seq[:end], clean_up_tokenization_spaces=False)
                bar.update(len(batch))
    return texts


def generate_per_label(
    base: LoadedModel,
    finetuned: LoadedModel,
    cfg: GenerateConfig,
    seq_len: int,
    labeller: Labeller,
    cache_root: Path | None = None,
    progress: bool = True,
) -> list[str]:
    """Up to `cfg.docs` texts in equal shares per label (the first docs mod C labels one more),
    grouped by label: samples of the contrastive distribution given θ1's label, by rejection.

    Round 0 draws `cfg.docs` texts (exactly `generate`'s, for the same seed), later rounds as many
    as the open shares need at the label rates seen so far (at most `cfg.docs`); each text is kept
    while its label's share is open, until every share is full or `cfg.max_draws` (0: 4 × docs)
    texts were drawn. A label the finetuned model rarely assigns may then stay short, which is
    logged, not padded. Each round is an unconditional draw cached under `cache_root` like
    `--generate`'s, so a killed run resumes after its last finished round (and round 0 reuses a
    `--generate` run of the same seed)."""
    n_labels = labeller.num_labels
    share = [cfg.docs // n_labels + (c < cfg.docs % n_labels) for c in range(n_labels)]
    kept: list[list[str]] = [[] for _ in share]
    seen = [0] * n_labels  # texts drawn so far that θ1 gave each label
    limit, drawn, round_ = cfg.max_draws or 4 * cfg.docs, 0, 0
    while drawn < limit and any(len(k) < s for k, s in zip(kept, share, strict=True)):
        seed = (
            cfg.seed if round_ == 0 else int(np.random.SeedSequence([cfg.seed, round_]).generate_state(1)[0])
        )
        need = max(
            math.ceil((s - len(k)) * drawn / max(n, 1)) for k, s, n in zip(kept, share, seen, strict=True)
        )
        size = cfg.docs if round_ == 0 else min(cfg.docs, max(need, cfg.batch_size))
        draw = replace(cfg, docs=min(size, limit - drawn), seed=seed, per_label=False, max_draws=0)
        texts = generate_cached(base, finetuned, draw, seq_len, cache_root, progress=progress)
        for text, label in zip(texts, labeller.label(texts).tolist(), strict=True):
            seen[label] += 1
            if len(kept[label]) < share[label]:
                kept[label].append(text)
        drawn, round_ = drawn + len(texts), round_ + 1
    short = {c: s - len(k) for c, (k, s) in enumerate(zip(kept, share, strict=True)) if len(k) < s}
    if short:
        log.warning(
            "--generate-per-label: after %d draws, labels %s are short of their shares by %s documents "
            "(the finetuned model rarely assigns them; raise --generate-max-draws)",
            drawn, list(short), list(short.values()),
        )  # fmt: skip
    return [text for texts in kept for text in texts]


def generate_cached(
    base: LoadedModel,
    finetuned: LoadedModel,
    cfg: GenerateConfig,
    seq_len: int,
    cache_root: Path | None,
    labeller: Labeller | None = None,
    progress: bool = True,
) -> list[str]:
    """generate() (generate_per_label() when `cfg.per_label`, which needs the `labeller`), reused
    from <cache>/generated/<key>.json when both models and the settings match."""
    if cfg.per_label and labeller is None:
        raise W2DError(
            "--generate-per-label needs a classifier's label set to condition on: use it with "
            "w2d select / w2d run on a classification finetune"
        )
    settings = {**to_dict(cfg), "seq_len": seq_len, "prefixes": openings(cfg.prefixes)}
    if cfg.per_label:
        settings["labels"] = labeller.key

    def make() -> list[str]:
        if cfg.per_label:
            return generate_per_label(base, finetuned, cfg, seq_len, labeller, cache_root, progress)
        return generate(base, finetuned, cfg, seq_len, progress)

    if cache_root is None:
        return make()
    key = stable_hash({"base": base.fingerprint, "finetuned": finetuned.fingerprint, "settings": settings})
    path = Path(cache_root) / "generated" / f"{key}.json"
    if path.exists():
        log.info("reusing %d generated documents from %s", cfg.docs, path)
        return read_json(path)["texts"]
    texts = make()
    write_json(path, {"settings": settings, "texts": texts})
    return texts


def with_generated(
    corpus: Split,
    base: LoadedModel,
    finetuned: LoadedModel,
    cfg: GenerateConfig | None,
    seq_len: int,
    cache_root: Path | None,
    labeller: Labeller | None = None,
) -> tuple[Split, list[str]]:
    """The corpus with `cfg.docs` generated candidates appended, and each row's source.

    The corpus's own labels are dropped with them: selection labels every candidate itself.
    `seq_len`: the task's, used unless the config sets one. `labeller`: a classifier's, for
    `cfg.per_label`.
    """
    if cfg is None or not cfg.docs:
        return corpus, [CORPUS] * len(corpus)
    texts = generate_cached(base, finetuned, cfg, cfg.seq_len or seq_len, cache_root, labeller)
    log.info("%d generated candidates appended to the %d corpus documents", len(texts), len(corpus))
    return Split(corpus.texts + texts, None), [CORPUS] * len(corpus) + [GENERATED] * len(texts)


def mark_sources(
    recovery: Recovery, sources: list[str], generated_labels: dict[str, int] | None = None
) -> Recovery:
    """The recovery with each pick's source, and the generated counts in its summary, with
    `generated_labels` (recover.generated_label_distribution) when given."""
    picked = [sources[i] for i in recovery.rows.tolist()]
    counts: dict = {
        "generated_candidates": sources.count(GENERATED),
        "generated_picks": picked.count(GENERATED),
    }
    if generated_labels is not None:
        counts["generated_labels"] = generated_labels
    return replace(recovery, sources=picked, summary={**recovery.summary, **counts})


def write_generated(texts: list[str], out_dir: Path) -> Path:
    """<out_dir>/generated.parquet: text, source = generated; a dataset argument for other commands."""
    path = Path(out_dir) / "generated.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"text": texts, "source": [GENERATED] * len(texts)}), tmp)
    return path
