"""LoRA / PEFT adapters as finetuned models, and weight changes kept dense or as adapter factors.

A LoRA adapter changes each adapted linear layer by (α/r) B A, so the target of a layer is
ΔW = W_base − W_finetuned = −(α/r) B A (out × in, rank r, DESIGN §6). Every use of ΔW goes
through a `WeightDelta`, one of two kinds:
- `DenseDelta`: the difference of two weight matrices (full finetunes, merged checkpoints);
- `LowRankDelta`: the adapter's factors. The inner product with a per-example gradient
  Σ_t δ_t x_tᵀ is Σ_t (δ_tᵀ B)(A x_t) · scale, its Kronecker sketch (R_outᵀ B)(A R_in) · scale and
  ‖ΔW‖² = scale² Σ (BᵀB) ∘ (A Aᵀ): nothing out × in is formed, for a V × d head neither.

The finetuned model itself is the base with the adapter merged into a copy of its weights, so
hidden states, labels and losses come from the same forward pass as for any finetuned directory.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from weights2data.config import SelectConfig
from weights2data.errors import W2DError
from weights2data.models import META_FILE, LoadedModel, has_tokenizer
from weights2data.store import read_json

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names


@dataclass
class DenseDelta:
    """ΔW of one layer as a matrix (out × in)."""

    weight: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def times(self, x: Tensor) -> Tensor:
        """x ΔWᵀ: (..., in) -> (..., out)."""
        return x @ self.weight.T

    def left_times(self, e: Tensor) -> Tensor:
        """e ΔW: (..., out) -> (..., in)."""
        return e @ self.weight

    def rows(self, ids: Tensor) -> Tensor:
        return self.weight[ids]

    def bucket_sum(self, bucket: Tensor, sign: Tensor, buckets: int) -> Tensor:
        """(buckets, in): Σ_v sign_v ΔW_v over the rows v hashed to each bucket (a count sketch)."""
        return self.weight.new_zeros(buckets, self.shape[1]).index_add_(
            0, bucket, self.weight * sign[:, None]
        )

    def kron_sketch(self, r_out: Tensor, r_in: Tensor) -> Tensor:
        """R_outᵀ ΔW R_in, flattened."""
        return ((r_out.T @ self.weight) @ r_in).reshape(-1)

    def row_norms(self) -> Tensor:
        return self.weight.norm(dim=1)

    def sq_norm(self) -> float:
        return float(self.weight.double().square().sum())


@dataclass
class LowRankDelta:
    """ΔW = scale · B A of one adapted layer, kept as its factors (scale = −α/r for base − finetuned)."""

    b: Tensor  # (out, r)
    a: Tensor  # (r, in)
    scale: float

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.b.shape[0], self.a.shape[1]))

    def to(self, device: torch.device | str) -> LowRankDelta:
        return LowRankDelta(self.b.to(device), self.a.to(device), self.scale)

    def times(self, x: Tensor) -> Tensor:
        return ((x @ self.a.T) @ self.b.T) * self.scale

    def left_times(self, e: Tensor) -> Tensor:
        return ((e @ self.b) @ self.a) * self.scale

    def rows(self, ids: Tensor) -> Tensor:
        return (self.b[ids] @ self.a) * self.scale

    def bucket_sum(self, bucket: Tensor, sign: Tensor, buckets: int) -> Tensor:
        hashed = self.b.new_zeros(buckets, self.b.shape[1]).index_add_(0, bucket, self.b * sign[:, None])
        return (hashed @ self.a) * self.scale

    def kron_sketch(self, r_out: Tensor, r_in: Tensor) -> Tensor:
        return ((r_out.T @ self.b) @ (self.a @ r_in) * self.scale).reshape(-1)

    def row_norms(self) -> Tensor:
        """‖ΔW_v‖ = |scale| √(b_v (A Aᵀ) b_vᵀ) for every row v."""
        gram = self.a @ self.a.T  # (r, r)
        return ((self.b @ gram) * self.b).sum(1).clamp_min(0).sqrt() * abs(self.scale)

    def sq_norm(self) -> float:
        b, a = self.b.double(), self.a.double()
        return float(((b.T @ b) * (a @ a.T)).sum()) * self.scale**2

    def dense(self) -> Tensor:
        """The matrix itself (tests, and small layers only)."""
        return (self.b @ self.a) * self.scale


WeightDelta = DenseDelta | LowRankDelta


@dataclass
class Adapter:
    """A LoRA adapter applied to the base: its factors per adapted linear layer, by module name."""

    layers: dict[str, LowRankDelta]  # e.g. "model.layers.0.self_attn.q_proj" -> ΔW = base − finetuned
    config: dict  # adapter_config.json

    @property
    def head_adapted(self) -> bool:
        return any(name.split(".")[-1] == "lm_head" for name in self.layers)

    def describe(self) -> str:
        modules = sorted({name.split(".")[-1] for name in self.layers})
        return (
            f"LoRA r={self.config.get('r')}, alpha={self.config.get('lora_alpha')}, "
            f"{len(self.layers)} layers ({', '.join(modules)})"
        )


def is_adapter(spec: str | Path) -> bool:
    return (Path(spec).expanduser() / ADAPTER_CONFIG).is_file()


def load_adapter(base: LoadedModel, path: str | Path) -> LoadedModel:
    """The base model with the LoRA adapter in `path` merged into a copy of its weights, and the
    adapter's factors; the tokenizer is the adapter's own when it has one, else the base's."""
    path = Path(path).expanduser()
    config = read_json(path / ADAPTER_CONFIG)
    if str(config.get("peft_type", "")).upper() != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise W2DError(f"{path}: only LoRA adapters are supported (this one is {kind})")
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise W2DError("LoRA adapters need the peft package: pip install peft") from exc
    try:
        wrapped = PeftModel.from_pretrained(copy.deepcopy(base.model), path)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise W2DError(
            f"could not apply the adapter in {path} to --base {base.spec}: it was trained on "
            f"{config.get('base_model_name_or_path')!r}; is --base that model? ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]})"
        ) from exc
    layers = adapter_factors(wrapped, path)
    model = wrapped.merge_and_unload().eval()
    tokenizer = base.tokenizer
    if has_tokenizer(path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    meta = read_json(path / META_FILE) if (path / META_FILE).exists() else {}
    loaded = LoadedModel(model, tokenizer, str(path), path, meta, adapter=Adapter(layers, config))
    log.info("%s: %s, merged into a copy of %s", path, loaded.adapter.describe(), base.spec)
    return loaded


def adapter_factors(wrapped: torch.nn.Module, path: Path) -> dict[str, LowRankDelta]:
    """ΔW = −scale · B A of every LoRA layer of a PeftModel, keyed by the base model's module name."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear) or module.fan_in_fan_out:
            raise W2DError(
                f"{path}: LoRA on {name} ({type(module.get_base_layer()).__name__}) is not supported"
            )
        a = module.lora_A["default"].weight.detach().float()  # (r, in)
        b = module.lora_B["default"].weight.detach().float()  # (out, r)
        layers[name.removeprefix(PEFT_PREFIX)] = LowRankDelta(b, a, -float(module.scaling["default"]))
    if not layers:
        raise W2DError(f"{path}: the adapter holds no LoRA layers")
    return layers


def weight_delta(base: LoadedModel, finetuned: LoadedModel, name: str, device: torch.device) -> WeightDelta:
    """ΔW = base − finetuned of the linear module `name` (e.g. "lm_head"): from the adapter's factors
    when it adapted that module, else from the two weight matrices."""
    adapter = getattr(finetuned, "adapter", None)
    if adapter is not None and name in adapter.layers:
        return adapter.layers[name].to(device)
    modules_a, modules_b = dict(base.model.named_modules()), dict(finetuned.model.named_modules())
    wa, wb = modules_a[name].weight.detach(), modules_b[name].weight.detach()
    if wa.shape != wb.shape:
        raise W2DError(f"{name} differs in shape: base {tuple(wa.shape)} vs finetuned {tuple(wb.shape)}")
    return DenseDelta(wa.to(device).float() - wb.to(device).float())


def select_for_adapter(cfg: SelectConfig, base: LoadedModel, finetuned: LoadedModel) -> SelectConfig:
    """An adapter that leaves the LM head as it is changed only its adapted layers: select on their
    gradients (--grad-blocks -1) unless the user chose blocks. (A head the adapter saved whole, as
    peft's modules_to_save does, counts as changed.)"""
    adapter = getattr(finetuned, "adapter", None)
    if adapter is None or cfg.grad_blocks:
        return cfg
    heads = [m.model.get_output_embeddings().weight for m in (base, finetuned)]
    if adapter.head_adapted or not torch.equal(heads[0], heads[1].to(heads[0].device)):
        return cfg
    log.warning(
        "the adapter (%s) leaves the LM head unchanged: selecting on the gradients of its adapted layers "
        "(--grad-blocks -1)",
        adapter.describe(),
    )
    return replace(cfg, grad_blocks=-1)
