"""Gradient rows larger than memory: a float16 / float32 .npy file read in row chunks at each step.

The greedy engine needs, per pick, one product of the (N, D) gradient matrix with the chosen
row; everything else it keeps is N-sized. So the matrix may stay on disk (memory-mapped: the
page cache holds what fits) and be read once per pick, `chunk_rows` rows at a time, each chunk
moved to `device` and widened to float32 there: memory is bounded by one chunk, and a GPU reads
a chunk while the previous one is multiplied. At N = 1,000,000 and D = 4096 the file is 8 GB in
float16; one pick reads all of it, so a step costs file size / read bandwidth.

Row i's products are computed in float32 from the same stored values whatever the chunking, so
`StreamedFeatures` over a float32 file picks what `DenseFeatures` over the same matrix picks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights2data.errors import W2DError
from weights2data.selection import DenseFeatures
from weights2data.store import atomic_path

CHUNK_ROWS = 16384  # rows per read: 128 MB of float16 at D = 4096
DTYPES = {"float16": np.float16, "float32": np.float32}


def write_rows(path: Path, rows: Iterator[Tensor], n: int, d: int, dtype: str = "float16") -> Path:
    """Write an (n, d) .npy file from chunks of rows (atomically: a killed write leaves no file)."""
    if dtype not in DTYPES:
        raise W2DError(f"unknown row dtype {dtype!r}: use {' or '.join(DTYPES)}")
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(n, d))
        start = 0
        for chunk in rows:
            out[start : start + len(chunk)] = chunk.detach().cpu().numpy().astype(DTYPES[dtype])
            start += len(chunk)
        if start != n:
            raise W2DError(f"{path}: {start} rows were written, {n} announced")
        out.flush()
        del out
    return Path(path)


class StreamedFeatures:
    """DenseFeatures whose gradient matrix (N, D) stays in a .npy file, read in chunks of rows.

    `target_dots` / `sq_norms` may be given exactly (as for DenseFeatures); otherwise one pass over
    the file computes them. N-sized vectors live on `device`; so does each chunk while it is used.
    """

    def __init__(
        self,
        path: Path,
        delta: Tensor,
        target_dots: Tensor | None = None,
        sq_norms: Tensor | None = None,
        *,
        device: torch.device | str = "cpu",
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.path, self.device, self.chunk_rows = Path(path), torch.device(device), chunk_rows
        self.rows = np.load(
            self.path, mmap_mode="c"
        )  # (N, D), read lazily; "c": writable views, never written
        if self.rows.ndim != 2 or self.rows.dtype not in (np.float16, np.float32):
            raise W2DError(f"{path} must hold a 2-D float16 or float32 matrix, not {self.rows.dtype}")
        self.delta = delta.float().to(self.device)
        if tuple(self.delta.shape) != (self.rows.shape[1],):
            raise W2DError(f"delta must be (D={self.rows.shape[1]},), got {tuple(self.delta.shape)}")
        self.delta_sq_norm = float(self.delta.double().square().sum())
        self.bytes_read = 0  # for benchmarks: what the steps so far read from the file
        if target_dots is None or sq_norms is None:
            target_dots, sq_norms = self._first_pass()
        self.target_dots = target_dots.float().to(self.device)
        self.sq_norms = sq_norms.float().to(self.device)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, float32 chunk on the device) over the whole file."""
        for start in range(0, len(self), self.chunk_rows):
            part = self.rows[start : start + self.chunk_rows]
            self.bytes_read += part.nbytes
            host = torch.from_numpy(np.ascontiguousarray(part))
            if self.device.type == "cuda":
                host = host.pin_memory()
            yield slice(start, start + len(part)), host.to(self.device, non_blocking=True).float()

    def matvec(self, v: Tensor) -> Tensor:
        """(N,) rows @ v, one chunk at a time."""
        out = torch.empty(len(self), device=self.device)
        for rows, chunk in self.chunks():
            out[rows] = chunk @ v
        return out

    def _first_pass(self) -> tuple[Tensor, Tensor]:
        dots, sq = torch.empty(len(self), device=self.device), torch.empty(len(self), device=self.device)
        for rows, chunk in self.chunks():
            dots[rows], sq[rows] = chunk @ self.delta, chunk.square().sum(1)
        return dots, sq

    def dots_with(self, j: int) -> Tensor:
        return self.dots_with_factors(self.row_factors(torch.tensor([j])))

    def dots_with_sum(self, picks: Tensor, rows: Tensor | None = None) -> Tensor:
        total = self._read(picks).sum(0)  # (D,)
        return self.matvec(total) if rows is None else self._read(rows) @ total

    def row_factors(self, rows: Tensor) -> list[Tensor]:
        rows = rows.cpu()
        return [self._read(rows), self.target_dots[rows], self.sq_norms[rows]]

    def dots_with_factors(self, factors: list[Tensor]) -> Tensor:
        return self.matvec(factors[0][0])

    def with_rows(self, factors: list[Tensor]) -> DenseFeatures:
        return DenseFeatures(factors[0], self.delta, factors[1], factors[2])

    def _read(self, rows: Tensor) -> Tensor:
        """(len(rows), D) float32 on the device: a few rows, read directly."""
        picked = self.rows[rows.cpu().numpy()]
        self.bytes_read += picked.nbytes
        return torch.from_numpy(picked).to(self.device).float()
