"""Shared fixtures: a session cache reusing the SmolLM2 conversion, the data directory, tiny models."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOME_MODELS = Path.home() / ".cache" / "weights2data" / "models"
SHARED_MODELS = ("smollm2-135m", "smollm2-tokenizer")


def link_models(cache: Path, source_models: Path) -> None:
    """Symlink already-converted models (SmolLM2 and its tokenizer) into `cache`/models, when present."""
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in SHARED_MODELS:
        source = source_models / name
        if (source / "config.json").exists() or (source / "tokenizer.json").exists():
            target = models / name
            if not target.exists():
                target.symlink_to(source.resolve(), target_is_directory=True)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache directory for the test session; the SmolLM2 conversion is reused, not redone."""
    root = tmp_path_factory.mktemp("w2d-cache")
    link_models(root, HOME_MODELS)
    from weights2data.models import smollm2_tokenizer

    smollm2_tokenizer(root)  # built once here when the user's cache does not have it
    return root


@pytest.fixture
def fresh_cache(tmp_path: Path, cache: Path) -> Path:
    """An empty cache of its own (for CLI runs), sharing only the converted models."""
    root = tmp_path / "cache"
    link_models(root, cache / "models")
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("W2D_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (root / "ag_news" / "train.parquet").exists():
        pytest.fail(f"the test data is missing: expected {root}/ag_news/train.parquet; set $W2D_DATA_DIR")
    return root


@pytest.fixture(params=["1", None], ids=["HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE unset"])
def hub_offline(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test both with the hub declared offline and without: either way it must fail fast."""
    if request.param is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", request.param)


@pytest.fixture(scope="session")
def tokenizer(cache: Path):
    from weights2data.models import smollm2_tokenizer

    return smollm2_tokenizer(cache)


@pytest.fixture(scope="session")
def _tiny_master(cache: Path):
    from weights2data.models import load_model

    return load_model("tiny-test", cache=cache)


@pytest.fixture
def tiny(_tiny_master):
    """A fresh tiny-test model (2 layers, hidden 64, SmolLM2 tokenizer): identical on every call.

    A deep copy of one loaded model (the tokenizer is shared), which is faster than building it again.
    """
    from weights2data.models import LoadedModel

    return LoadedModel(copy.deepcopy(_tiny_master.model), _tiny_master.tokenizer, _tiny_master.spec)


def nudged(model, scale: float):
    """A 'finetune' of LoadedModel `model`: a copy with every weight moved by scale · N(0, 1) (seed 0)."""
    import torch

    from weights2data.models import LoadedModel

    tuned = LoadedModel(copy.deepcopy(model.model), model.tokenizer, f"{model.spec}+nudged")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return tuned


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_cache: Path, data_dir: Path) -> Path:
    """Environment for CLI runs: own cache, the data directory, and a scratch working directory."""
    monkeypatch.setenv("W2D_CACHE_DIR", str(fresh_cache))
    monkeypatch.setenv("W2D_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """The CLI adds handlers to the 'weights2data' logger on every call; drop them after each test."""
    logger = logging.getLogger("weights2data")
    before, level = list(logger.handlers), logger.level
    yield
    for handler in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)


@pytest.fixture(scope="session")
def make_adapter():
    """Save a LoRA adapter of a model with peft, both factors drawn from a seeded generator (peft
    starts B at zero and draws A from the global generator, which earlier tests move)."""
    import torch
    from peft import LoraConfig, get_peft_model

    def save(base, path: Path, targets: list[str], scale_b: float = 0.05) -> Path:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base.model), config)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:  # peft's kaiming-uniform scale, 1 / sqrt(fan_in)
                    p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
                if "lora_B" in name:
                    p.copy_(scale_b * torch.randn(p.shape, generator=generator))
        model.save_pretrained(path)
        return path

    return save
