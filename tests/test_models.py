"""models: the tiny test model, local directories and every way a model argument can be bad."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights2data.errors import W2DError
from weights2data.models import load_model, untie_head


def _save(loaded, path: Path) -> Path:
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_tiny_test_model_is_deterministic_per_seed(cache: Path) -> None:
    a, b = load_model("tiny-test", cache=cache), load_model("tiny-test", cache=cache)
    c = load_model("tiny-test:1", cache=cache)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert c.spec == "tiny-test:1"
    assert a.model.config.num_hidden_layers == 2 and a.model.config.tie_word_embeddings
    assert a.tokenizer.pad_token is not None
    assert len(a.tokenizer) == a.model.config.vocab_size


def test_tiny_test_bad_seed(cache: Path) -> None:
    with pytest.raises(W2DError, match="tiny-test"):
        load_model("tiny-test:abc", cache=cache)


def test_local_directory_round_trip(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    loaded = load_model(str(path), cache=cache)
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.path == path and loaded.meta == {}
    assert not loaded.model.training


def test_body_fingerprint_ignores_an_untied_head(tiny) -> None:
    before = tiny.body_fingerprint
    untie_head(tiny.model)
    full = tiny.fingerprint
    with torch.no_grad():
        tiny.model.get_output_embeddings().weight.add_(1.0)
    assert tiny.body_fingerprint == before
    assert tiny.fingerprint != full
    assert tiny.model.get_input_embeddings().weight is not tiny.model.get_output_embeddings().weight


def test_fingerprints_follow_in_place_changes(tiny) -> None:
    body, full = tiny.body_fingerprint, tiny.fingerprint
    assert tiny.body_fingerprint == body  # cached, stable
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert tiny.body_fingerprint != body and tiny.fingerprint != full


def test_directory_without_config(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(W2DError, match="no config.json"):
        load_model(str(tmp_path), cache=cache)


def test_directory_without_weights(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(W2DError, match="no weights"):
        load_model(str(path), cache=cache)


def test_pickle_only_directory_needs_allow_pickle(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(W2DError, match="--allow-pickle") as err:
        load_model(str(path), cache=cache)
    assert "pytorch_model.bin" in str(err.value)
    loaded = load_model(str(path), cache=cache, allow_pickle=True)
    assert loaded.fingerprint == tiny.fingerprint


def test_truncated_safetensors(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(W2DError, match="could not load"):
        load_model(str(path), cache=cache)


def test_garbage_safetensors(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(W2DError):
        load_model(str(path), cache=cache)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(tiny, tmp_path: Path, cache: Path, value: float) -> None:
    with torch.no_grad():
        tiny.model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    path = _save(tiny, tmp_path / "m")
    with pytest.raises(W2DError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN or inf"):
        load_model(str(path), cache=cache)


def test_missing_tensors(tiny, tmp_path: Path, cache: Path) -> None:
    path = _save(tiny, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    dropped = [k for k in state if k.startswith("model.layers.1.self_attn.")]
    assert dropped
    save_file(
        {k: v for k, v in state.items() if k not in dropped},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(W2DError, match=r"missing weights for \d+ tensors.*layers\.1\.self_attn"):
        load_model(str(path), cache=cache)


def test_untied_model_missing_its_head(tiny, tmp_path: Path, cache: Path) -> None:
    untie_head(tiny.model)
    path = _save(tiny, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" in state
    del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(W2DError, match="lm_head"):
        load_model(str(path), cache=cache)


def test_missing_directory_path(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(W2DError, match="model directory not found"):
        load_model(str(tmp_path / "nope"), cache=cache)
    with pytest.raises(W2DError, match="model directory not found"):
        load_model("./no/such/model", cache=cache)


@pytest.mark.usefixtures("hub_offline")
@pytest.mark.parametrize(
    ("spec", "repo"),
    [
        ("someone/no-such-model-w2d", "someone/no-such-model-w2d"),
        ("llama3-1b", "meta-llama/Llama-3.2-1B"),
        ("tinyllama", "TinyLlama/TinyLlama_v1.1"),
    ],
)
def test_hub_names_fail_fast_offline(cache: Path, spec: str, repo: str) -> None:
    started = time.monotonic()
    with pytest.raises(W2DError) as err:
        load_model(spec, cache=cache)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert repo in message
    assert "unreachable" in message and "--model /path/to/model" in message


def test_bfloat16_weights_hash_apart_and_features_stay_float32(cache: Path, data_dir: Path) -> None:
    from weights2data.config import DataConfig, SelectConfig
    from weights2data.data import load_dataset, make_label_set
    from weights2data.recover import corpus_gradients

    full = load_model("tiny-test", cache=cache)
    half = load_model("tiny-test", cache=cache, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.body_fingerprint != full.body_fingerprint  # their cached states never mix
    texts = load_dataset("wiki_passages_40", data_dir=data_dir).train.texts
    label_set = make_label_set(["A", "B", "C", "D"], half.tokenizer, "A,B,C,D")
    grads = corpus_gradients(half, half, texts, label_set, DataConfig(seq_len=16), SelectConfig(k=4), None)
    reference = corpus_gradients(
        full, full, texts, label_set, DataConfig(seq_len=16), SelectConfig(k=4), None
    )
    assert grads.features.hidden.dtype == grads.features.errors.dtype == torch.float32
    torch.testing.assert_close(grads.features.hidden, reference.features.hidden, atol=0.1, rtol=0.05)
