"""LoRA adapters: their Δ against the merged model's, block-gradient inner products against autograd,
the head's factored terms against dense ones, and `w2d select` on an adapter directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weights2data.adapters import DenseDelta, LowRankDelta, load_adapter, select_for_adapter
from weights2data.block_gradients import block_features
from weights2data.cli import main
from weights2data.config import SelectConfig
from weights2data.data import encode_classification, encode_lm
from weights2data.errors import W2DError
from weights2data.lm_features import head_delta, lm_features
from weights2data.models import LoadedModel, load_model, tiny_test_model, untie_head

TEXTS = [
    "The team won the championship after a dramatic overtime goal.",
    "Stocks fell sharply as investors worried about interest rates.",
    "A new species of frog was discovered in the rainforest.",
    "Oil prices rose after the pipeline was shut down.",
    "Hi",
    "Elections were held peacefully across the country.",
]
SEQ_LEN = 12
TOKEN_IDS = [100, 101, 102, 103]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(cache) -> LoadedModel:
    return tiny_test_model(cache)


@pytest.fixture(scope="module")
def lora(base, make_adapter, tmp_path_factory) -> LoadedModel:
    return load_adapter(base, make_adapter(base, tmp_path_factory.mktemp("lora") / "adapter", TARGETS))


def test_lora_delta_equals_the_merged_models(base, lora) -> None:
    tuned = dict(lora.model.named_modules())
    assert len(lora.adapter.layers) == 2 * len(TARGETS) and not lora.adapter.head_adapted
    for name, delta in lora.adapter.layers.items():
        merged = (base.model.get_submodule(name).weight - tuned[name].weight).detach()
        torch.testing.assert_close(delta.dense(), merged.detach(), atol=1e-6, rtol=1e-5)
        assert delta.sq_norm() == pytest.approx(float(merged.double().square().sum()), rel=1e-4)
        x = torch.randn(3, delta.shape[1])
        torch.testing.assert_close(delta.times(x), x @ merged.detach().T, atol=1e-5, rtol=1e-4)
    assert "r=4" in lora.adapter.describe() and lora.tokenizer is base.tokenizer  # none saved: the base's


def per_example_grads(model: torch.nn.Module, encoded, names: list[str], loss_of) -> torch.Tensor:
    """(N, P) float64 autograd gradients of each document's loss w.r.t. the named linear weights."""
    model = copy.deepcopy(model).double()
    model.requires_grad_(False)
    weights = [model.get_submodule(name).weight for name in names]
    out = []
    for i in range(len(encoded)):
        row = encoded.subset(slice(i, i + 1))
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        final = model.base_model(
            input_ids=row.input_ids, attention_mask=row.attention_mask, position_ids=row.position_ids
        ).last_hidden_state
        loss = loss_of(model, final, i)
        if loss.requires_grad:
            loss.backward()
        out.append(
            torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).reshape(-1) for w in weights])
        )
    return torch.stack(out)


def test_lora_block_gradients_match_autograd(base, lora) -> None:
    encoded = encode_classification(lora.tokenizer, TEXTS, SEQ_LEN)
    labels = torch.tensor([i % 4 for i in range(len(TEXTS))])
    rows = lora.model.lm_head.weight.detach()[TOKEN_IDS]

    def loss(final, _batch, index):
        return F.cross_entropy(final[:, -1] @ rows.T, labels[index], reduction="sum")

    out = block_features(base, lora, encoded, loss, blocks=-1, dim=64, seed=5, batch_size=4, progress=False)
    assert out.start == 0 and out.layers == len(lora.adapter.layers)  # the adapted layers only
    names = list(lora.adapter.layers)
    dense = per_example_grads(
        lora.model,
        encoded,
        names,
        lambda _m, f, i: F.cross_entropy(f[:, -1] @ rows.double().T, labels[i : i + 1], reduction="sum"),
    )
    delta = torch.cat([lora.adapter.layers[n].dense().double().reshape(-1) for n in names])
    exact = dense @ delta  # float32 features: an error relative to the largest term (some terms cancel)
    atol = 1e-5 * float(exact.abs().max())
    torch.testing.assert_close(out.features.target_dots.double(), exact, rtol=1e-4, atol=atol)
    torch.testing.assert_close(out.features.sq_norms.double(), dense.square().sum(1), rtol=1e-4, atol=1e-12)
    assert out.features.delta_sq_norm == pytest.approx(float(delta.square().sum()), rel=1e-4)
    # a merged checkpoint (the same weights, no factors) gives the same exact terms
    merged = LoadedModel(lora.model, lora.tokenizer, "merged")
    plain = block_features(base, merged, encoded, loss, blocks=-1, dim=64, seed=5, progress=False)
    torch.testing.assert_close(plain.features.target_dots, out.features.target_dots, rtol=1e-4, atol=1e-7)
    assert plain.layers == out.layers  # unchanged layers are left out of both


def test_lora_head_terms_match_dense(cache, make_adapter, tmp_path) -> None:
    """An adapter on an untied head: LM-head and full-vocabulary terms from its factors, never V × d."""
    base = tiny_test_model(cache)
    untie_head(base.model)
    lora = load_adapter(base, make_adapter(base, tmp_path / "head", ["lm_head", "q_proj"], scale_b=0.5))
    assert lora.adapter.head_adapted and isinstance(head_delta(base, lora), LowRankDelta)
    merged = LoadedModel(lora.model, lora.tokenizer, "merged")
    assert isinstance(head_delta(base, merged), DenseDelta)
    encoded = encode_lm(lora.tokenizer, TEXTS, SEQ_LEN)
    factored = lm_features(base, lora, encoded, dim=64, progress=False, dtype=torch.float32).features
    dense = lm_features(base, merged, encoded, dim=64, progress=False, dtype=torch.float32).features
    torch.testing.assert_close(factored.target_dots, dense.target_dots, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(factored.grads, dense.grads, rtol=1e-3, atol=1e-5)
    assert factored.delta_sq_norm == pytest.approx(dense.delta_sq_norm, rel=1e-4)
    low, full = head_delta(base, lora), head_delta(base, merged)
    torch.testing.assert_close(low.row_norms(), full.row_norms(), rtol=1e-3, atol=1e-6)
    draw = torch.Generator().manual_seed(0)  # fixed: a random draw sometimes summed past the tolerance
    bucket = torch.randint(8, (low.shape[0],), generator=draw)
    sign = torch.randn(low.shape[0], generator=draw)
    torch.testing.assert_close(
        low.bucket_sum(bucket, sign, 8), full.bucket_sum(bucket, sign, 8), atol=1e-4, rtol=1e-3
    )


def test_adapter_selects_on_its_layers(base, lora) -> None:
    cfg = select_for_adapter(SelectConfig(k=4), base, lora)
    assert cfg.grad_blocks == -1
    assert select_for_adapter(SelectConfig(k=4, grad_blocks=1), base, lora).grad_blocks == 1  # the user's


def test_cli_select_on_an_adapter(cli_env: Path, base, make_adapter, capsys: pytest.CaptureFixture) -> None:
    adapter = make_adapter(base, cli_env / "adapter", TARGETS)
    select = ["select", "--base", "tiny-test", "--finetuned", str(adapter), "--corpus", "wiki_passages_40"]
    select += ["-k", "6", "--label-set", "A,B,C,D", "--results-dir", "runs"]
    assert main([*select, "--exp-name", "sel"]) == 0
    summary = json.loads((cli_env / "runs" / "sel" / "summary.json").read_text())
    assert summary["config"]["grad_blocks"] == -1 and summary["block_layers"] == 6
    assert summary["gradients"].startswith("changed blocks only")
    assert "leaves the LM head unchanged" in capsys.readouterr().err
    untrained = make_adapter(base, cli_env / "untrained", TARGETS, scale_b=0.0)
    assert main([*select[:4], str(untrained), *select[5:], "--exp-name", "zero"]) == 2
    err = capsys.readouterr().err
    assert "LoRA adapter" in err and "B factor is zero" in err and "Traceback" not in err


def test_directory_without_tokenizer(base, cache, tmp_path: Path) -> None:
    path = tmp_path / "trainer-output"
    base.model.save_pretrained(path)  # as Trainer.save_model does without a tokenizer
    with pytest.raises(W2DError, match="no tokenizer files"):
        load_model(str(path), cache=cache)
    loaded = load_model(str(path), cache=cache, tokenizer=base.tokenizer)
    assert loaded.tokenizer is base.tokenizer


def test_adapter_on_the_wrong_base(cache, make_adapter, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = tiny_test_model(cache)
    adapter = make_adapter(base, tmp_path / "adapter", TARGETS)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(vocab_size=len(base.tokenizer), num_hidden_layers=2, **shape)
    other = LoadedModel(AutoModelForCausalLM.from_config(config), base.tokenizer, "other")
    with pytest.raises(W2DError, match="could not apply the adapter"):
        load_adapter(other, adapter)


def test_pair_from_different_families(base) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    from weights2data.recover import check_pair

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(W2DError, match="different model families.*gpt2, 300 tokens"):
        check_pair(base, LoadedModel(gpt2, base.tokenizer, "gpt2-tiny"))
