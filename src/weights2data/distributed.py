"""Many processes, one selection: the corpus split by rows across the ranks of a process group.

`torchrun --nproc-per-node N -m weights2data select …` starts N copies of the command with
RANK, WORLD_SIZE and LOCAL_RANK set. Each rank featurises a contiguous block of corpus rows
(its shard) into the usual row-addressed cache, so a killed rank resumes from its finished
chunks and any later run (another world size, one process, a subset) reuses those rows.

Selection then runs over the shards with the picks of one process (DESIGN §6): every greedy
step each rank proposes its best row (score, global row index), an all-gather picks the
winner (ties to the lowest global index, as argmax does in one process), the winner's owner
broadcasts its gradient factors, and every rank updates ⟨g_i, R⟩ for its own rows with the
very arithmetic one process uses. The other strategies rank one number per document, so
they gather those N-sized vectors and rank them as one process does.

Shards start at multiples of SHARD_ALIGN rows, a multiple of every featurisation batch size,
so each document's forward pass runs in the same batch as in one process: bit for bit the
same features, hence exactly the same picks. A preconditioner is fitted on the whole corpus's
moments, each rank's share summed by an all-reduce (`Shard.corpus_slice`), as one process fits it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from weights2data.config import SelectConfig
from weights2data.errors import W2DError
from weights2data.precondition import CorpusSlice
from weights2data.selection import (
    GREEDY,
    WITHOUT_GRADIENTS,
    GradientFeatures,
    Selection,
    check_selection,
    cosines,
    greedy_scores,
    objective,
    pooled_out,
    ranked,
    weighted,
)

if TYPE_CHECKING:
    from weights2data.recover import CorpusGradients

SHARD_ALIGN = 32  # rows; the hidden-state batch (32) and the gradient batches (16) divide it


@dataclass(frozen=True)
class Layout:
    """Which process this is among how many (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Layout:
        env = os.environ if env is None else env
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        try:
            rank, world, local = (int(env.get(name, d)) for name, d in zip(names, "010", strict=True))
        except ValueError as exc:
            raise W2DError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc
        if not 0 <= rank < world:
            raise W2DError(f"RANK must lie in 0..WORLD_SIZE-1 (got RANK={rank}, WORLD_SIZE={world})")
        return cls(rank, world, local)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """A rank's device: its own GPU (cuda:LOCAL_RANK) when the command asked for cuda."""
        if self.sharded and requested.type == "cuda" and requested.index in (None, 0):
            return torch.device("cuda", self.local_rank)
        return requested


@contextlib.contextmanager
def process_group(layout: Layout, device: torch.device) -> Iterator[None]:
    """Join the group torchrun set up (MASTER_ADDR / MASTER_PORT): nccl on GPUs, gloo on CPUs."""
    if not layout.sharded:
        yield
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise W2DError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are unset: launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=layout.rank, world_size=layout.world_size)
    except (RuntimeError, ValueError) as exc:  # a taken port, an unreachable master, a timeout
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise W2DError(
            f"rank {layout.rank} could not join the {backend} process group at {where}: {exc}"
        ) from exc
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_rows(n: int, layout: Layout, align: int = SHARD_ALIGN) -> range:
    """This rank's contiguous rows of n: blocks of `align` rows dealt out evenly, in rank order."""
    blocks = math.ceil(n / align)
    if blocks < layout.world_size:
        raise W2DError(
            f"a corpus of {n} documents is too small to split over {layout.world_size} ranks "
            f"({align} rows at least each): use fewer processes"
        )
    first, last = (r * blocks // layout.world_size for r in (layout.rank, layout.rank + 1))
    return range(first * align, min(last * align, n))


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a corpus split over a process group, and the collectives over them."""

    layout: Layout
    rows: range  # this rank's global rows
    sizes: tuple[int, ...]  # every rank's row count, in rank order
    device: torch.device  # where collectives run: the GPU under nccl, else the CPU

    @classmethod
    def of(cls, n: int, layout: Layout, device: torch.device) -> Shard:
        sizes = tuple(len(shard_rows(n, replace(layout, rank=r))) for r in range(layout.world_size))
        comm = device if device.type == "cuda" else torch.device("cpu")
        return cls(layout, shard_rows(n, layout), sizes, comm)

    def owner(self, row: int) -> int:
        """The rank holding global `row`."""
        end = 0
        for rank, size in enumerate(self.sizes):
            end += size
            if row < end:
                return rank
        raise IndexError(row)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's `x` (its rows first) joined in rank order: (Σ sizes, ...) from (size, ...)."""
        return self.gather_varying(x, list(self.sizes))

    def gather_varying(self, x: Tensor, counts: list[int]) -> Tensor:
        """As gather, when rank r holds counts[r] rows (all_gather needs equal shapes: pad)."""
        padded = x.new_zeros((max(counts), *x.shape[1:]), device=self.device)
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(x.device)

    def sum(self, x: Tensor) -> Tensor:
        """`x` summed over every rank (an all-reduce)."""
        moved = x.to(self.device, copy=True).contiguous()
        dist.all_reduce(moved)
        return moved.to(x.device)

    def corpus_slice(self) -> CorpusSlice:
        """This rank's rows as a slice of the corpus, its statistics summed over every rank."""
        return CorpusSlice(self.rows.start, sum(self.sizes), self.sum)

    def broadcast(self, tensors: list[Tensor], src: int) -> list[Tensor]:
        """Rank `src`'s tensors on every rank (the others pass buffers of the same shapes)."""
        out = []
        for t in tensors:
            moved = t.to(self.device).contiguous()
            dist.broadcast(moved, src)
            out.append(moved.to(t.device))
        return out

    def best(self, proposal: Tensor) -> Tensor:
        """Of every rank's (score, global row, …) proposal, the highest score; ties to the lowest row."""
        every = self.gather_varying(proposal[None], [1] * self.layout.world_size)  # (W, fields)
        tied = every[every[:, 0] == every[:, 0].max()]
        return tied[tied[:, 1].argmin()]


def sharded_greedy(
    shard: Shard,
    features: GradientFeatures,
    k: int,
    *,
    batch_size: int | None = None,
    quotas: tuple[Tensor, Tensor] | None = None,
    weights: Tensor | None = None,
    blocked: Tensor | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """selection.greedy over the rows of every rank, `features` and `weights` holding this rank's;
    the same (indices, scores) on every rank. `quotas` = (labels (N,) of the whole corpus, quota (C,));
    `blocked` (this rank's rows,): rows never to pick."""
    t, sq, w = weighted(features, weights)
    start = shard.rows.start
    chosen = torch.zeros(len(features), dtype=torch.bool, device=t.device)  # also: label quota filled
    if blocked is not None:
        chosen |= blocked.to(t.device)
    labels = torch.zeros(len(features), dtype=torch.long, device=t.device)
    if quotas is not None:
        labels, left = quotas[0][start : shard.rows.stop].to(t.device), quotas[1].clone().to(t.device)
        chosen |= left[labels] <= 0
    like = features.row_factors(torch.tensor([0]))  # one row's factors: what a receiver allocates
    picks, scores = [], []
    bar = progress and shard.layout.rank == 0
    for step in tqdm(range(k), desc=f"greedy over {len(shard.sizes)} ranks", disable=not bar):
        if step % (batch_size or k) == 0:
            r_dot, r_sq, c = 0.0, 0.0, torch.zeros_like(t)
        rank = greedy_scores(t, sq, c, r_dot, r_sq, chosen)
        j = int(rank.argmax())
        w_j = 1.0 if w is None else float(w[j])
        mine = [float(rank[j]), start + j, float(t[j]), float(c[j]), float(sq[j]), int(labels[j]), w_j]
        value, row, t_j, c_j, sq_j, label, w_j = shard.best(torch.tensor(mine, dtype=torch.float64)).tolist()
        row, label, owner = int(row), int(label), shard.owner(int(row))
        if owner == shard.layout.rank:
            factors = shard.broadcast(features.row_factors(torch.tensor([row - start])), owner)
        else:
            factors = shard.broadcast([torch.empty_like(f) for f in like], owner)
        picks.append(row)
        scores.append(value / math.sqrt(features.delta_sq_norm))
        if owner == shard.layout.rank:
            chosen[row - start] = True
        if quotas is not None:
            left[label] -= 1
            if left[label] == 0:
                chosen |= labels == label
        r_dot += t_j
        r_sq += 2 * c_j + sq_j
        dots = features.dots_with_factors(factors)
        c += dots if w is None else w * (w_j * dots)
    stats = {"engine": "float32 step, sharded", "ranks": len(shard.sizes)}
    return torch.tensor(picks, dtype=torch.long), torch.tensor(scores, dtype=torch.float32), stats


def gather_picks(shard: Shard, features: GradientFeatures, indices: Tensor) -> GradientFeatures:
    """The picked rows' gradients, from whichever ranks hold them, as one object on every rank:
    row i is pick i."""
    owners = torch.tensor([shard.owner(i) for i in indices.tolist()], dtype=torch.long)
    mine = indices[owners == shard.layout.rank] - shard.rows.start
    counts = torch.bincount(owners, minlength=len(shard.sizes)).tolist()
    factors = [shard.gather_varying(f, counts) for f in features.row_factors(mine)]
    order = owners.argsort(stable=True)  # the gathered rows: by rank, then in pick order
    back = order.argsort()
    return features.with_rows([f[back.to(f.device)] for f in factors])


def sharded_select(
    shard: Shard,
    strategy: str,
    features: GradientFeatures | None,
    k: int,
    *,
    labels: Tensor | None = None,
    losses: Tensor | None = None,
    base_losses: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 32,
    num_labels: int | None = None,
    label_prior: Tensor | None = None,
    exclude: Tensor | None = None,
    weights: Tensor | None = None,
    pool: float = 0.0,
    progress: bool = True,
) -> Selection:
    """selection.select with `features` and `weights` holding this rank's rows (`labels`, `losses`,
    `base_losses`, `exclude`: the whole corpus's); every rank returns the selection one process
    would make. As there, excluded rows (and those outside a pool) leave the candidates: the
    quotas count the rest, greedy never proposes them, the ranked strategies rank the rest."""
    n = sum(shard.sizes)
    pooled = pool > 0 and strategy not in WITHOUT_GRADIENTS
    ranks_by_cos = strategy in ("topk", "bottomk", "topk_balanced")
    cos = shard.gather(cosines(features)) if pooled or ranks_by_cos else None
    if pooled:
        exclude = pooled_out(cos, strategy, k, pool, labels, num_labels, label_prior, exclude)
    keep = torch.ones(n, dtype=torch.bool)
    if exclude is not None:
        keep[exclude] = False
    rows = keep.nonzero().squeeze(1)  # the candidates

    def candidates(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows.to(x.device)]

    quotas = check_selection(
        strategy, features, k, len(rows), candidates(labels), batch_size, num_labels, label_prior
    )
    engine: dict = {}
    if strategy in GREEDY:
        size = batch_size if strategy == "greedy_batched" else None
        every = None if quotas is None else (labels.long(), quotas[1])  # greedy reads its own rows' labels
        blocked = ~keep[shard.rows.start : shard.rows.stop]
        indices, scores, engine = sharded_greedy(
            shard,
            features,
            k,
            batch_size=size,
            quotas=every,
            weights=weights,
            blocked=blocked,
            progress=progress,
        )
    else:
        sub_cos, sub_losses, sub_base = candidates(cos), candidates(losses), candidates(base_losses)
        indices, scores = ranked(
            strategy,
            k,
            len(rows),
            cos=sub_cos,
            losses=sub_losses,
            base_losses=sub_base,
            quotas=quotas,
            seed=seed,
        )
        indices = rows[indices.cpu()]
    indices = indices.cpu()
    picked = None if features is None else gather_picks(shard, features, indices)
    value = math.nan if picked is None else objective(picked, torch.arange(k))
    return Selection(indices=indices, scores=scores.cpu(), objective=value, engine=engine)


def check_shardable(cfg: SelectConfig, generated: int = 0, device_map: str | None = None) -> None:
    """Refuse, before any work, the options whose features depend on the whole corpus at once."""
    whole = {
        "--device-map auto (one process spreads one model over every GPU; a rank uses its own)": bool(
            device_map
        ),
        "--path distill": cfg.path == "distill",  # a walk trained on the whole corpus
        f"--rounds {cfg.rounds}": cfg.rounds > 1,
        "--generate": generated > 0,
    }
    for option, used in whole.items():
        if used:
            raise W2DError(f"{option} is not supported across ranks yet: run it in one process")


def sharded_gradients(
    shard: Shard, texts: list[str], compute: Callable[[list[str], CorpusSlice], CorpusGradients]
) -> CorpusGradients:
    """`compute` run on this rank's texts, as a slice of the corpus (its preconditioners' moments
    are summed over every rank); features stay local, the per-document labels, losses and label
    distributions (small) are gathered so that every rank holds them for the whole corpus."""
    local = compute(texts[shard.rows.start : shard.rows.stop], shard.corpus_slice())
    gathered = {
        name: None if getattr(local, name) is None else shard.gather(getattr(local, name))
        for name in ("labels", "losses", "base_losses", "probs", "tokens")
    }
    timings = {**local.timings, "ranks": len(shard.sizes)}
    return replace(local, timings=timings, **gathered)
