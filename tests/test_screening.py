import numpy as np
import pytest
import torch

from weights2data import screening
from weights2data.reference import original_greedy
from weights2data.screening import Int8Rows, screened_greedy
from weights2data.selection import DenseFeatures, greedy

pytestmark = pytest.mark.skipif(not screening.int8_kernel_available(), reason="no CPU int8 kernel here")


def _gradients(n: int, d: int, common: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients sharing a component of strength `common`; Δ sums a hidden tenth of them."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, d, generator=gen) + common * torch.randn(d, generator=gen)
    delta = grads[torch.randperm(n, generator=gen)[: n // 10]].sum(0) + torch.randn(d, generator=gen)
    return grads, delta


def _screened(grads: torch.Tensor, delta: torch.Tensor, k: int, **kwargs) -> tuple[torch.Tensor, dict]:
    f = DenseFeatures(grads, delta)
    picks, _, stats = screened_greedy(
        grads, f.target_dots, f.sq_norms, f.delta_sq_norm, k, progress=False, **kwargs
    )
    return picks, stats


@pytest.mark.parametrize(("common", "d"), [(0.5, 70), (2.0, 128), (0.0, 96)])
def test_screened_picks_equal_the_float64_reference(common, d):
    grads, delta = _gradients(1500, d, common, seed=3)
    picks, stats = _screened(grads, delta, 150)
    ref = original_greedy(grads.double().numpy(), delta.double().numpy(), 150)
    assert picks.tolist() == ref.tolist()
    assert stats["rows_read_per_pick"] < 1500


def test_screen_reads_few_rows_on_correlated_gradients():
    grads, delta = _gradients(4000, 64, 1.0, seed=4)
    _, stats = _screened(grads, delta, 400)
    assert stats["rows_read_per_pick"] < 400  # a tenth of the rows, or the screen is not screening
    assert stats["kernel_passes_per_pick"] < 0.9  # some picks were prefetched by an earlier pass


def test_screened_restarts_match_the_plain_engine(monkeypatch):
    grads, delta = _gradients(800, 48, 0.5, seed=5)
    features = DenseFeatures(grads, delta)
    plain, plain_scores, _ = greedy(features, 60, batch_size=7, progress=False)
    monkeypatch.setattr(screening, "MIN_ELEMENTS", 0)
    routed, routed_scores, stats = greedy(features, 60, batch_size=7, progress=False)
    assert routed.tolist() == plain.tolist()
    assert stats["engine"] == "int8 screen"
    torch.testing.assert_close(routed_scores, plain_scores, rtol=1e-5, atol=1e-6)


def test_int8_rows_norms_and_kernel():
    grads, _ = _gradients(50, 80, 0.5, seed=6)
    rows = Int8Rows.build(grads, chunk=16)
    assert rows.codes.shape == (50, 128) and not rows.codes[:, 80:].any()
    q = rows.codes[:, :80].double() * rows.scales.double()[:, None]
    true_residual, true_code = (grads.double() - q).norm(dim=1), q.norm(dim=1)
    # the stored norms are upper bounds, and tight ones
    assert torch.all(rows.residual_norms >= true_residual) and torch.all(rows.code_norms >= true_code)
    torch.testing.assert_close(rows.residual_norms, true_residual, rtol=1e-3, atol=0)
    torch.testing.assert_close(rows.code_norms, true_code, rtol=1e-4, atol=0)
    assert float((rows.residual_norms / rows.code_norms).max()) < 0.02
    x = grads[[7, 8, 9, 10]].to(torch.bfloat16)  # several query rows in one pass, as the prefetch does
    exact = x.double() @ q.T  # (4, 50)
    # the kernel's result is rounded to bfloat16; the screen budgets 2⁻⁷ of it
    sums = 80 * 2.0**-24 * x.double().norm(dim=1)[:, None] * q.norm(dim=1)  # float32 sums of 80 products
    assert torch.all((rows.dots(x).double() - exact).abs() <= 2.0**-7 * exact.abs() + sums)


def test_zero_rows_and_negative_targets():
    grads, delta = _gradients(300, 40, 0.5, seed=7)
    grads[::17] = 0.0
    delta = -delta
    picks, _ = _screened(grads, delta, 40)
    ref = original_greedy(grads.double().numpy(), delta.double().numpy(), 40)
    assert picks.tolist() == ref.tolist()
    assert np.unique(picks.numpy()).size == 40
