"""Full-vocabulary classification gradients (--label-loss full) against autograd on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from weights2data.adapters import DenseDelta
from weights2data.config import DataConfig, SelectConfig
from weights2data.data import encode_classification, make_label_set
from weights2data.errors import W2DError
from weights2data.features import hidden_states
from weights2data.gradients import FULL_EXACT_TOKENS, count_sketch, full_vocab_features
from weights2data.models import LoadedModel, tiny_test_model, untie_head
from weights2data.recover import corpus_gradients, recover

TEXTS = [
    "The team won the championship after a dramatic overtime goal.",
    "Stocks fell sharply as investors worried about interest rates.",
    "A new species of frog was discovered in the rainforest.",
    "Oil prices rose after the pipeline was shut down.",
    "Elections were held peacefully across the country.",
    "The museum opened an exhibition of medieval manuscripts.",
]
TOKEN_IDS = torch.tensor([100, 101, 102, 103])


@pytest.fixture(scope="module")
def pair(cache) -> tuple[LoadedModel, LoadedModel]:
    """A base and a finetune whose whole (untied) head moved, as a full-vocabulary loss moves it."""
    base = tiny_test_model(cache)
    untie_head(base.model)
    finetuned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, "tiny-full")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        head = finetuned.model.lm_head.weight
        head.add_(0.02 * torch.randn(head.shape, generator=generator))
        head[TOKEN_IDS] += 0.5 * torch.randn(len(TOKEN_IDS), head.shape[1], generator=generator)
    return base, finetuned


def test_full_vocabulary_terms_match_autograd(pair) -> None:
    base, finetuned = pair
    hidden = hidden_states(finetuned, encode_classification(finetuned.tokenizer, TEXTS, 16), last_only=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    weight = finetuned.model.lm_head.weight.detach()
    delta = base.model.lm_head.weight.detach() - weight
    features = full_vocab_features(hidden, (weight, None), DenseDelta(delta), TOKEN_IDS, labels, seed=1)
    w = weight.double().requires_grad_(True)
    grads = []
    for h, y in zip(hidden.double(), TOKEN_IDS[labels], strict=True):
        (g,) = torch.autograd.grad(F.cross_entropy((w @ h)[None], y[None]), w)
        grads.append(g.reshape(-1))
    dense = torch.stack(grads)  # (N, V·d)
    torch.testing.assert_close(
        features.target_dots.double(), dense @ delta.double().reshape(-1), rtol=1e-4, atol=1e-9
    )  # float32 sums over the V·d terms against float64: 1e-5 is within rounding on some CPUs
    torch.testing.assert_close(features.sq_norms.double(), dense.square().sum(1), rtol=1e-5, atol=1e-12)
    assert features.delta_sq_norm == pytest.approx(float(delta.double().square().sum()), rel=1e-6)
    # the label rows and the most probable rows are exact; the rest is sketched
    exact = dense.reshape(len(TEXTS), *weight.shape)[:, TOKEN_IDS]  # (N, C, d) = e_C hᵀ
    torch.testing.assert_close(
        torch.einsum("nc,nd->ncd", features.errors[:, : len(TOKEN_IDS)], features.hidden).double(), exact,
        rtol=1e-4, atol=1e-7,
    )  # fmt: skip
    assert features.errors.shape[1] == len(TOKEN_IDS) + FULL_EXACT_TOKENS + 1024
    gram = dense @ dense.T
    scale = gram.diagonal().sqrt()
    for j in range(len(TEXTS)):
        error = (features.dots_with(j).double() - gram[:, j]).abs() / (scale * scale[j])
        assert float(error.max()) < 1e-3


def test_count_sketch_is_unbiased() -> None:
    x, y = torch.randn(2, 500, dtype=torch.float64)
    skip = torch.arange(10)
    truth = float(x[10:] @ y[10:])
    estimates = []
    for seed in range(400):
        bucket, sign = count_sketch(500, 32, skip, seed)
        sx = torch.zeros(32, dtype=torch.float64).index_add_(0, bucket, x * sign.double())
        sy = torch.zeros(32, dtype=torch.float64).index_add_(0, bucket, y * sign.double())
        estimates.append(float(sx @ sy))
    mean = torch.tensor(estimates)
    assert abs(float(mean.mean()) - truth) < 4 * float(mean.std()) / 20


def test_select_with_the_full_vocabulary_loss(pair, tmp_path) -> None:
    base, finetuned = pair
    label_set = make_label_set(["a", "b", "c", "d"], finetuned.tokenizer, "letters")
    label_set = type(label_set)(label_set.names, label_set.tokens, TOKEN_IDS.tolist())
    data = DataConfig(seq_len=16, label_loss="full")
    grads = corpus_gradients(base, finetuned, TEXTS, label_set, data, SelectConfig(k=3), tmp_path)
    restricted = corpus_gradients(
        base, finetuned, TEXTS, label_set, DataConfig(seq_len=16), SelectConfig(k=3), tmp_path
    )
    assert torch.equal(grads.labels, restricted.labels)  # the same prediction under either loss
    assert (grads.losses > restricted.losses).all() and grads.timings["label_loss"] == "full"
    assert len(set(recover(grads, TEXTS, label_set, SelectConfig(k=3), progress=False).rows.tolist())) == 3
    with pytest.raises(W2DError, match="--label-loss restricted"):
        corpus_gradients(
            base, finetuned, TEXTS, label_set, data, SelectConfig(k=3, projection_dim=16), tmp_path
        )
