"""Weight updates (worker thread, model lock held): LoRA adapters merged into copies of the base
model, and the base model's weights reloaded in place (adapters merged again onto them)."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathrl.serve.protocol import InvalidRequest, LoadLoRAAdapterRequest
from mathrl.serve.registry import _Adapter, _Model, _Registry

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger("mathrl.serve")  # one logger for the whole package


def _adapter_files(path: str) -> Path:
    """The adapter directory, after checks that name what is wrong with it (a 400 naming lora_path)."""
    from safetensors import safe_open

    def bad(what: str) -> InvalidRequest:
        return InvalidRequest(f"lora_path: {path} {what}", "lora_path")

    root = Path(path)
    if not root.exists():
        raise bad("does not exist")
    if not root.is_dir():
        raise bad("is not a directory (expected a peft adapter saved with save_pretrained)")
    config = root / "adapter_config.json"
    if not config.is_file():
        raise bad("has no adapter_config.json: not a peft adapter saved with save_pretrained")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise bad(f"has an unreadable adapter_config.json (half-written?): {e}") from None
    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        raise bad("has adapter_config.json but no adapter_model.safetensors (half-written?)")
    try:
        with safe_open(str(weights), "pt") as f:  # reads the header; checks the file holds every tensor
            f.keys()
    except Exception as e:
        raise bad(f"has an unreadable adapter_model.safetensors (half-written?): {_one_line(e)}") from None
    return root


def _merge_adapter(base: PreTrainedModel, path: Path) -> tuple[PreTrainedModel, _Adapter]:
    """A copy of ``base`` with the adapter at ``path`` merged in (in fp32, then base's dtype), and
    what merges it again later. An adapter whose tensors do not match the model's layers is a 400."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    try:
        with torch.random.fork_rng(devices=[]):  # peft initialises the LoRA weights it then replaces
            peft_model = PeftModel.from_pretrained(_fp32_copy(base), str(path))
    except Exception as e:
        raise InvalidRequest(f"lora_path: {path} does not fit the served model: {_one_line(e)}", "lora_path") from None
    state = get_peft_model_state_dict(peft_model)
    missing, unexpected = sorted(set(state) - saved), sorted(saved - set(state))
    if missing or unexpected:
        which = (
            f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the served model has no place for"
        )
        raise InvalidRequest(
            f"lora_path: {path} does not fit the served model: its adapter_model.safetensors {which} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)",
            "lora_path",
        )
    adapter = _Adapter(str(path), copy.deepcopy(peft_model.peft_config["default"]), state)
    return _merged(peft_model, base.dtype), adapter


def _remerge(base: PreTrainedModel, adapter: _Adapter) -> PreTrainedModel:
    """``adapter`` merged into a copy of (new) base weights."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        peft_model = PeftModel(_fp32_copy(base), copy.deepcopy(adapter.config))
    set_peft_model_state_dict(peft_model, adapter.state)
    return _merged(peft_model, base.dtype)


def _fp32_copy(model: PreTrainedModel) -> PreTrainedModel:
    import torch

    duplicate = copy.deepcopy(model)
    return duplicate if duplicate.dtype == torch.float32 else duplicate.float()


def _merged(peft_model: Any, dtype: torch.dtype) -> PreTrainedModel:
    merged = peft_model.merge_and_unload()
    return merged.to(dtype).eval()  # type: ignore[no-any-return]


def _adapter_model(base: _Model, name: str, merged: PreTrainedModel, adapter: _Adapter) -> _Model:
    """A registry entry serving ``merged`` with the base's tokenizer, renderer settings and batch size."""
    from mathrl.rollout.backend import LocalBackend

    sampler = base.sampler
    assert sampler is not None
    renderer = getattr(base.backend, "renderer", None)
    backend = LocalBackend(
        merged,
        sampler.tokenizer,
        max_batch=sampler.max_batch,
        tool_parser=renderer.format.name if renderer is not None else "auto",
    )
    return _Model(name, backend, int(time.time()), root=adapter.path, parent=base.name, adapter=adapter)


def _load_adapter(registry: _Registry, req: LoadLoRAAdapterRequest) -> None:
    """Build and register an adapter (worker thread, model lock held)."""
    registry.check_load(req)  # again: another load may have run since the request came in
    base = registry.base
    sampler = base.sampler
    if sampler is None:
        raise InvalidRequest("this server's backend has no token sampler to merge adapters into", None, status=501)
    start = time.perf_counter()
    merged, adapter = _merge_adapter(sampler.model, _adapter_files(req.lora_path))
    registry.put(_adapter_model(base, req.lora_name, merged, adapter))
    log.info("loaded LoRA adapter %r from %s in %.1fs", req.lora_name, req.lora_path, time.perf_counter() - start)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``path`` (a save_pretrained directory)."""
    from safetensors.torch import load_file

    param = "kwargs.weights_path"
    root = Path(path)
    if not root.is_dir():
        raise InvalidRequest(f"{param}: {path} is not a directory", param)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise InvalidRequest(f"{param}: {path} has no *.safetensors files (save_pretrained writes them)", param)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise InvalidRequest(f"{param}: {f} is unreadable (half-written?): {_one_line(e)}", param) from None
    return tensors


def _reload_weights(registry: _Registry, weights_path: str) -> None:
    """Replace the base model's weights in place, then merge the loaded adapters again onto them
    (worker thread, model lock held). Every check runs before the first tensor is copied."""
    import torch

    sampler = registry.base.sampler
    if sampler is None:
        raise InvalidRequest("this server's backend has no model whose weights could be reloaded", None, status=501)
    start = time.perf_counter()
    model = sampler.model
    tensors = _read_weights(weights_path)
    state = model.state_dict()  # tied weights appear under each name, sharing storage
    param = "kwargs.weights_path"
    for name, t in tensors.items():
        if name not in state:
            raise InvalidRequest(f"{param}: tensor {name!r} in {weights_path} is not in the served model", param)
        if tuple(t.shape) != tuple(state[name].shape):
            raise InvalidRequest(
                f"{param}: tensor {name!r} in {weights_path} has shape {list(t.shape)}, "
                f"the served model's has {list(state[name].shape)}",
                param,
            )
    covered = {state[name].data_ptr() for name in tensors}
    missing = [name for name, p in model.named_parameters() if p.data_ptr() not in covered]
    if missing:
        raise InvalidRequest(
            f"{param}: {weights_path} lacks {len(missing)} of the served model's parameters (e.g. {missing[0]!r}); "
            "a partial update would mix old and new weights",
            param,
        )
    with torch.no_grad():
        for name, t in tensors.items():
            state[name].copy_(t)
    for old in registry.adapters():
        assert old.adapter is not None
        registry.put(_adapter_model(registry.base, old.name, _remerge(model, old.adapter), old.adapter), replacing=old)
    log.info(
        "reloaded weights from %s (%d adapters merged again) in %.1fs",
        weights_path,
        len(registry.adapters()),
        time.perf_counter() - start,
    )


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]
