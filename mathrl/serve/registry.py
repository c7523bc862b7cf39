"""The models requests can name: the served base model and the LoRA adapters merged into copies of it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mathrl.serve.protocol import InvalidRequest, LoadLoRAAdapterRequest

if TYPE_CHECKING:
    import torch

    from mathrl.rollout.backend import ChatBackend
    from mathrl.rollout.sampler import TorchSampler


@dataclass(frozen=True)
class _Adapter:
    """What merges an adapter again onto new base weights: its peft config and tensors."""

    path: str
    config: Any  # peft.PeftConfig
    state: dict[str, torch.Tensor]


@dataclass(eq=False)
class _Model:
    """One model a request can name: the served base model, or an adapter merged into a copy of it."""

    name: str
    backend: ChatBackend
    created: int
    root: str | None = None
    parent: str | None = None  # adapters: the base model's name
    adapter: _Adapter | None = None

    @property
    def sampler(self) -> TorchSampler | None:
        """The in-process token sampler (a LocalBackend's TorchSampler); None for a backend without one."""
        sampler = getattr(self.backend, "sampler", None)
        return sampler if hasattr(sampler, "model") and hasattr(sampler, "tokenizer") else None


class _Registry:
    """The base model and the loaded adapters by name. Copy-on-write: readers (the event loop) take
    ``models`` once and never see it change under them; writers (either thread) hold ``_mutex``."""

    def __init__(self, base: _Model, max_loras: int):
        self.base = base
        self.max_loras = max_loras
        self.models: dict[str, _Model] = {base.name: base}
        self._mutex = threading.Lock()

    def get(self, name: str | None) -> _Model:
        """The model a request names (None: the base model); an unknown name is vLLM's 404."""
        if name is None:
            return self.base
        model = self.models.get(name)
        if model is None:
            raise InvalidRequest(f"The model `{name}` does not exist.", "model", status=404, code="model_not_found")
        return model

    def adapters(self) -> list[_Model]:
        return [m for m in self.models.values() if m.adapter is not None]

    def check_load(self, req: LoadLoRAAdapterRequest) -> None:
        """vLLM's checks of a load request, plus the ``max_loras`` cap."""
        if not req.lora_name or not req.lora_path:
            raise InvalidRequest("Both 'lora_name' and 'lora_path' must be provided.", None)
        if req.lora_name == self.base.name:
            raise InvalidRequest(f"The lora adapter '{req.lora_name}' conflicts with a served base model.", "lora_name")
        if req.lora_name in self.models and not req.load_inplace:
            raise InvalidRequest(
                f"The lora adapter '{req.lora_name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
                "lora_name",
            )
        others = [m.name for m in self.adapters() if m.name != req.lora_name]
        if len(others) >= self.max_loras:
            raise InvalidRequest(
                f"max_loras: this server holds at most {self.max_loras} adapters and has {', '.join(others) or 'none'}"
                " loaded; unload one first (POST /v1/unload_lora_adapter)",
                "max_loras",
            )

    def put(self, model: _Model, replacing: _Model | None = None) -> bool:
        """Add or replace ``model`` by name; with ``replacing``, only if that is still the entry."""
        with self._mutex:
            if replacing is not None and self.models.get(model.name) is not replacing:
                return False
            self.models = {**self.models, model.name: model}
            return True

    def remove(self, name: str) -> None:
        with self._mutex:
            if name not in self.models or self.models[name].adapter is None:
                raise InvalidRequest(
                    f"The lora adapter '{name}' cannot be found.", "lora_name", status=404, code="model_not_found"
                )
            self.models = {k: v for k, v in self.models.items() if k != name}
