"""Gradients streamed from a file: the same picks as in memory, memory bounded by a chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weights2data.errors import W2DError
from weights2data.selection import DenseFeatures, select
from weights2data.streaming import StreamedFeatures, write_rows


def gradients(n: int = 300, d: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=gen)
    return torch.randn(n, d, generator=gen) + 0.3 * delta, delta


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("strategy", ["greedy", "greedy_batched", "topk"])
def test_streamed_picks_equal_in_memory(tmp_path: Path, dtype: str, strategy: str) -> None:
    grads, delta = gradients()
    path = write_rows(tmp_path / "g.npy", iter(grads.split(64)), *grads.shape, dtype=dtype)
    stored = grads.to(getattr(torch, dtype)).float()  # what the file holds
    streamed = StreamedFeatures(path, delta, chunk_rows=37)
    memory = DenseFeatures(stored, delta)
    torch.testing.assert_close(streamed.target_dots, memory.target_dots)
    a = select(strategy, streamed, 40, batch_size=9, progress=False)
    b = select(strategy, memory, 40, batch_size=9, progress=False)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.objective == pytest.approx(b.objective, abs=1e-6)


def test_streamed_reads_the_file_once_per_pick(tmp_path: Path) -> None:
    grads, delta = gradients()
    path = write_rows(tmp_path / "g.npy", iter([grads]), *grads.shape, dtype="float16")
    streamed = StreamedFeatures(path, delta, grads @ delta, grads.square().sum(1), chunk_rows=50)
    before = streamed.bytes_read
    streamed.dots_with(3)
    assert streamed.bytes_read - before == grads.numel() * 2 + grads.shape[1] * 2  # the file and row 3


def test_bad_files(tmp_path: Path) -> None:
    grads, delta = gradients()
    with pytest.raises(W2DError, match="299 rows were written, 300 announced"):
        write_rows(tmp_path / "g.npy", iter([grads[:299]]), *grads.shape)
    assert not (tmp_path / "g.npy").exists()
    path = write_rows(tmp_path / "g.npy", iter([grads]), *grads.shape)
    with pytest.raises(W2DError, match="delta must be"):
        StreamedFeatures(path, delta[:5])
