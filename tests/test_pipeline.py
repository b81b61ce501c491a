"""The workspace: devices, the finetune cache and what it saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import weights2data
from weights2data import pipeline
from weights2data.config import DataConfig, FinetuneConfig
from weights2data.data import load_dataset
from weights2data.errors import W2DError
from weights2data.models import load_model
from weights2data.pipeline import Workspace, finetune_cached, finetune_key, pick_device, task_for_model
from weights2data.store import stable_hash
from weights2data.train import Task, finetune, resolve_task


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(W2DError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(W2DError, match="no GPU is available"):
            pick_device("cuda")


@pytest.fixture
def workspace(fresh_cache: Path, data_dir: Path) -> Workspace:
    return Workspace(fresh_cache, data_dir, torch.device("cpu"))


def test_saved_head_model_reloads_in_plain_transformers(
    workspace: Workspace, data_dir: Path, cache: Path
) -> None:
    ds = load_dataset("ag_news_48", data_dir=data_dir)
    data, cfg = (
        DataConfig(dataset="ag_news_48", seq_len=16),
        FinetuneConfig(train_scope="head", lr=1e-2, epochs=2),
    )
    path, meta = finetune_cached(workspace, "tiny-test", ds, data, cfg)
    assert (path / "w2d.json").exists() and (path / "model.safetensors").exists()
    assert meta["untied_head"] and meta["task"]["kind"] == "classification" and len(meta["history"]) == 2
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert plain.config.tie_word_embeddings is False
    assert plain.get_input_embeddings().weight.data_ptr() != plain.get_output_embeddings().weight.data_ptr()
    # the same finetune in memory gives the same weights and logits
    reference = load_model("tiny-test", cache=cache)
    finetune(reference, ds.train, Task.from_dict(meta["task"]), cfg)
    enc = Task.from_dict(meta["task"]).encode(reference, ds.test.texts[:8])
    inputs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids)
    with torch.no_grad():
        assert torch.allclose(reference.model(**inputs).logits, plain(**inputs).logits, atol=1e-5)
    base = load_model("tiny-test", cache=cache).model
    assert torch.equal(plain.get_input_embeddings().weight, base.get_input_embeddings().weight)
    reloaded = load_model(str(path), cache=workspace.cache)
    assert reloaded.meta["cache_key"] == meta["cache_key"] == path.name
    task = task_for_model(reloaded, DataConfig(seq_len=24), ds)
    assert task.seq_len == 24
    assert task.label_set.token_ids == meta["task"]["label_set"]["token_ids"]


def test_finetune_cache_reuse_and_keys(
    workspace: Workspace, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset("ag_news_16", data_dir=data_dir)
    data, cfg = DataConfig(seq_len=8), FinetuneConfig(train_scope="head", lr=1e-2, epochs=1)
    first, meta = finetune_cached(workspace, "tiny-test", ds, data, cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(pipeline, "finetune", no_training)
    second, meta2 = finetune_cached(workspace, "tiny-test", ds, data, cfg)
    assert second == first and meta2 == meta
    # any changed input trains again
    other_lr = FinetuneConfig(train_scope="head", lr=2e-2, epochs=1)
    with pytest.raises(AssertionError, match="trained again"):
        finetune_cached(workspace, "tiny-test", ds, data, other_lr)
    other_data = load_dataset("ag_news_16", data_dir=data_dir, seed=1)
    with pytest.raises(AssertionError, match="trained again"):
        finetune_cached(workspace, "tiny-test", other_data, data, cfg)
    base = workspace.model("tiny-test")
    task = resolve_task(data, ds, base)
    key = finetune_key(base, ds, task, cfg)
    assert stable_hash(key) == first.name and meta["key"] == key
    assert key["device"] == "cpu" and key["weights2data"] == weights2data.__version__
    assert finetune_key(base, ds, task, other_lr) != key
    assert finetune_key(base, other_data, task, cfg) != key
    assert finetune_key(base, ds, resolve_task(DataConfig(seq_len=9), ds, base), cfg) != key
    assert (
        finetune_key(base, ds, resolve_task(DataConfig(seq_len=8, verbalizer="w,x,y,z"), ds, base), cfg)
        != key
    )
    assert finetune_key(base, ds, task, FinetuneConfig(train_scope="head", lr=1e-2, epochs=1, seed=1)) != key
    with torch.no_grad():
        base.model.model.norm.weight[0] += 1.0  # other base weights
    assert finetune_key(base, ds, task, cfg) != key
