"""The stages wired together: load inputs, finetune with a content-keyed cache, evaluate.

The CLI calls these; so can a Python user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from weights2data.config import DataConfig, FinetuneConfig, RuntimeConfig, to_dict
from weights2data.data import Dataset, Split, data_dir, load_dataset
from weights2data.errors import W2DError
from weights2data.features import cache_key
from weights2data.models import META_FILE, LoadedModel, load_model, save_model
from weights2data.store import cache_dir, read_json, stable_hash, touch
from weights2data.templates import resolve_template
from weights2data.train import Task, finetune, resolve_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """Where things are read from and cached, and which device computes."""

    cache: Path
    data_dir: Path | None
    device: torch.device
    allow_pickle: bool = False
    dtype: str = "float32"  # the models' weights (RuntimeConfig.dtype)
    device_map: str | None = None  # "auto": spread a large model over the GPUs

    @classmethod
    def from_config(cls, runtime: RuntimeConfig, data: DataConfig | None = None) -> Workspace:
        return cls(
            cache_dir(runtime.cache_dir),
            data_dir(data.data_dir if data else None),
            pick_device(runtime.device),
            runtime.allow_pickle,
            runtime.dtype,
            runtime.device_map,
        )

    def model(self, spec: str) -> LoadedModel:
        return load_model(spec, cache=self.cache, device=self.device, **self._loading())

    def _loading(self) -> dict:
        return {"allow_pickle": self.allow_pickle, "dtype": self.dtype, "device_map": self.device_map}

    def finetuned(self, spec: str, base: LoadedModel) -> LoadedModel:
        """A finetune of `base`: a model (a directory without a tokenizer borrows the base's), or a
        LoRA adapter directory, merged into a copy of the base; checked to share the base's
        architecture, weight shapes and tokenizer."""
        from weights2data.adapters import is_adapter, load_adapter
        from weights2data.recover import check_pair

        if is_adapter(spec):
            finetuned = load_adapter(base, spec)
        else:
            finetuned = load_model(
                spec, cache=self.cache, device=self.device, tokenizer=base.tokenizer, **self._loading()
            )
        check_pair(base, finetuned)
        return finetuned

    def corpus(self, spec: str, data: DataConfig, k: int, seed: int = 0) -> Split:
        """The candidate corpus (a dataset's training split), checked to hold at least k documents."""
        corpus = self.dataset(spec, data, seed).train
        if k > len(corpus):
            raise W2DError(f"k = {k} is larger than the corpus ({len(corpus)} documents)")
        return corpus

    def dataset(self, spec: str, data: DataConfig, seed: int = 0) -> Dataset:
        return load_dataset(
            spec,
            data_dir=self.data_dir,
            text_column=data.text_column,
            label_column=data.label_column,
            seed=seed,
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise W2DError(f"unknown device '{name}': use cpu, cuda, cuda:N, mps or auto") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise W2DError(f"unsupported device '{name}': use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise W2DError(f"--device {name} was asked for but no GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise W2DError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise W2DError(f"--device {name} was asked for but this machine has no usable MPS (Apple GPU)")
    return device


def finetune_key(base: LoadedModel, dataset: Dataset, task: Task, cfg: FinetuneConfig) -> dict:
    """Every input that changes the finetuned weights: base weights, data content, task, settings,
    and the versions and device kind that train."""
    return cache_key(
        next(base.model.parameters()).device,
        base=base.fingerprint,
        train=dataset.train.fingerprint,
        task=task.to_dict(),
        finetune=to_dict(cfg),
    )


def finetune_cached(
    ws: Workspace, base_spec: str, dataset: Dataset, data: DataConfig, cfg: FinetuneConfig
) -> tuple[Path, dict]:
    """Finetune `base_spec` on the training split, or reuse an identical earlier result.

    Returns the saved model directory (a Hugging Face safetensors folder with w2d.json)
    and its metadata.
    """
    base = ws.model(base_spec)
    task = resolve_task(data, dataset, base, cfg.lm_loss)
    cfg = cfg.for_task(task.kind)  # the key and the metadata record the learning rate used
    key = finetune_key(base, dataset, task, cfg)
    target = ws.cache / "finetuned" / stable_hash(key)
    if (target / META_FILE).exists():
        log.info("reusing the finetuned model %s (same base, data and settings)", target)
        touch(target / META_FILE)
        return target, read_json(target / META_FILE)
    result = finetune(base, dataset.train, task, cfg, cache_root=ws.cache)
    meta = {
        "weights2data": 1,
        "base": base_spec,
        "dataset": dataset.name,
        "task": task.to_dict(),
        "finetune": to_dict(cfg),
        "untied_head": result["untied_head"],
        "history": result["history"],
        "cache_key": target.name,
        "key": key,
    }
    save_model(base, target, meta)
    return target, meta


def task_for_model(loaded: LoadedModel, data: DataConfig, dataset: Dataset) -> Task:
    """The task a weights2data model was trained for, else the one the dataset implies."""
    if "task" in loaded.meta:
        task = Task.from_dict(loaded.meta["task"])
        template = resolve_template(data.template, data.chat_template, loaded.meta)
        return replace(
            task, seq_len=data.seq_len, template=template, label_loss=data.label_loss or task.label_loss
        )
    return resolve_task(data, dataset, loaded)
