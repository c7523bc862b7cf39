"""``mathrl serve``: an OpenAI-compatible server for any model mathrl can load, speaking vLLM's
dialect for RL trainers, so a remote-sampler client works unchanged against vLLM or this server.

Endpoints (request and response shapes are vLLM 0.32's unless a difference is listed below):
- ``POST /v1/chat/completions``: conversations in, replies out (non-streaming; tools below).
- ``POST /v1/completions``: prompts as token ids (a list of ints, or a list of such lists) or text
  (a string or a list of strings, tokenized without a chat template, ``add_special_tokens`` as
  vLLM); ``n``, ``max_tokens`` (default 16, as vLLM's), ``temperature``, ``top_p``, ``seed``,
  ``stop`` with ``include_stop_str_in_output``, ``stop_token_ids``, ``skip_special_tokens``,
  ``logprobs`` (0..20: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``),
  ``return_token_ids`` (per choice ``token_ids``: every generated id, and ``prompt_token_ids``),
  ``return_tokens_as_token_ids``. Choice ``i * n + j`` is prompt i's sample j; each choice has
  ``finish_reason`` ("stop"/"length") and vLLM's ``stop_reason`` (the stop string or stop token id
  that ended it, null for EOS or length). Text is cut as vLLM cuts it: before a stop string (after
  it with ``include_stop_str_in_output``), the EOS/stop token left out; ``token_ids`` keep every
  token up to the one that completed the stop string, EOS or stop token included.
- ``POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}``: a peft adapter
  (``save_pretrained`` output) merged into a copy of the served model, in the worker thread; requests
  then name it as ``model``. 200 with vLLM's text "Success: LoRA adapter 'x' added successfully.";
  a name in use is a 400 (unless ``load_inplace``), a bad ``lora_path`` (missing, not an adapter,
  half-written, another architecture) a 400 naming it and what is wrong, more than ``max_loras``
  adapters a 400 asking to unload one.
- ``POST /v1/unload_lora_adapter {"lora_name"}``: 200 "Success: LoRA adapter 'x' removed
  successfully."; an unknown name is vLLM's 404. Requests already queued for it still finish.
- ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``: the base
  model's weights replaced in place from DIR's ``*.safetensors`` (every parameter, shapes equal, else
  a 400 naming the tensor; dtypes are converted), between two model calls; loaded adapters are
  merged again onto the new weights. 200 ``{"results": [null]}``; another method is a 400 naming it.
- ``POST /reset_prefix_cache``: 200 ``{"success": true}``; nothing to reset (see below).
- ``GET /v1/models``: the base model and each adapter (``parent`` = the base's id, ``root`` = its
  path); ``GET /health``.
The three weight-changing endpoints are on when the server listens on loopback only; on another
address they answer 403 unless it was started with ``allow_weight_updates=true`` (vLLM offers them
only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` / ``VLLM_SERVER_DEV_MODE``): anyone who can reach the
port could otherwise swap the weights.

Every request field is either honoured or refused with a 400 naming it (chat: ``logprobs``,
penalties, ``logit_bias``, ``response_format``, ``tool_choice`` other than auto/none, ``stream``...;
completions: ``stream``, ``echo``, ``suffix``, ``best_of``, penalties, ``logit_bias``, ``top_k``,
``min_p``, ``min_tokens``, ``ignore_eos``, beam search, ``prompt_logprobs``...; any unknown field):
a client never gets a silently different result. Any OpenAI client works against it, and so do
:class:`mathrl.rollout.openai_backend.OpenAIBackend` (chat, for ``mathrl eval`` / ``distill``) and
:class:`mathrl.rollout.remote.RemoteSampler` (token ids and weight updates, for ``mathrl train``).

Tools (chat): a request's ``tools`` are rendered into the prompt (natively by a template with tool
support, else described in the system message in ``tool_parser``'s format, see
:mod:`mathrl.rollout.renderer`), ``role: "tool"`` messages and assistant ``tool_calls`` in the
history are accepted, and a reply that calls a tool comes back as OpenAI ``tool_calls`` with
``finish_reason: "tool_calls"``.

How generation is scheduled. The model is blocking torch code, so it runs in one dedicated worker
thread, never in the event loop, and a lock makes sure two model calls never overlap. Requests are
queued; each model call takes the oldest queued request and every other queued request of the same
kind (chat or completions), for the same model (base or adapter), with the same sampling settings
(``max_tokens``, ``temperature``, ``top_p``, stop strings), up to ``max_batch`` sequences, and serves
them all with ONE ``backend.generate`` / ``TorchSampler.sample`` call: on a CPU a batch of 8 costs
little more than a single prompt. Requests that arrive while the model is busy wait for the next
call; an idle server waits ``batch_window_ms`` after the first request so a burst of concurrent
requests shares one call. Adapter loads and weight reloads run in the same worker thread between
two calls, so they never change the weights under a running call.

What is guaranteed about reproducibility:
- temperature 0 (greedy) ignores the seed. The server never changes a request's own prompt, only
  what it is batched with. With ``dtype=fp32`` greedy replies were identical batched and unbatched in
  our tests; with ``dtype=bf16`` they can differ (the sampler computes the prefix shared by a batch
  once and pads the rest, and bf16 rounding depends on those shapes): prefer fp32 when exact
  reproducibility matters (on a CPU it is also the faster one).
- temperature > 0: every row draws from its own random stream, so its sample does not depend on
  what it is batched with: chat sample j of a request with seed s uses seed s + j; completions
  prompt i sample j uses s + i * n + j (one prompt: s + j, as chat). A request without a seed gets
  a random one. Same seed, same reply (up to the dtype note above).

Where mathrl serve differs from vLLM (0.32):
- Logprobs are those of the distribution sampled from (logits / temperature, then the top-p cut,
  renormalised; greedy: temperature 1), as :class:`~mathrl.rollout.sampler.TorchSampler` computes
  them: vLLM's default ``logprobs_mode=raw_logprobs`` returns the model's raw temperature-1 logprobs
  (its ``processed_logprobs`` mode is what this server returns). The ``top_logprobs`` alternatives
  (``logprobs`` >= 1) come from the same distribution, computed by one extra forward pass over each
  choice's tokens (so they cost time; ``logprobs: 0`` does not), and the sampled entry carries the
  sampler's own value. Token strings are ``tokenizer.decode([id])``; vLLM also repairs characters
  split across byte tokens and SentencePiece leading spaces.
- Seeds: vLLM seeds every prompt of a request with s (sample j: s + j), so two equal prompts in one
  request get equal samples; here prompt i sample j draws from s + i * n + j. Neither depends on
  batching; the random streams differ from vLLM's, so samples are not the same as vLLM's.
- Defaults are OpenAI's (temperature 1, top_p 1); vLLM takes them from the model's
  ``generation_config.json`` (``--generation-config auto``). Send them explicitly.
- ``stop_token_ids`` are applied after sampling: a row runs on to EOS or ``max_tokens`` (time
  only; what it returns is what stopping at the token gives, since each row's draws are its own).
- Adapters are merged into full copies of the model (exact, fast to sample from, but memory: one
  model per adapter); at most ``max_loras`` (default 4) are loaded, loading another is a 400 asking
  to unload one. vLLM keeps up to ``--max-loras`` on the GPU and swaps others in from CPU memory.
  A bad ``lora_path`` is a 400 here; vLLM answers 404 (missing path) or 500 (anything else).
- ``reload_weights`` needs every parameter in ``weights_path`` (vLLM loads a partial checkpoint
  with a warning) and takes no ``args`` or ``timeout``; an unknown ``collective_rpc`` method is a
  400 here (an error from the workers in vLLM).
- No prefix cache: every call prefills its prompts (a prompt shared by a call's rows once), so
  ``/reset_prefix_cache`` has nothing to do and ``cache_salt`` nothing to salt.
- Not implemented (a 400 naming the field): streaming, ``echo``, ``suffix``, ``best_of``,
  penalties, ``logit_bias``, ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, beam search,
  ``prompt_logprobs``, structured outputs, ``logprobs`` over 20 or -1. vLLM accepts unknown fields
  (logging a warning); this server refuses them. Errors have OpenAI's shape (``type``
  ``invalid_request_error``, ``code`` a string or null) where vLLM's carry ``type`` e.g.
  ``NotFoundError`` and the status as ``code``; the messages for an unknown model and adapter are vLLM's.
- Stop strings are found in the decoded text as vLLM finds them, but the sampler also ends a row
  early once its text decoded with special tokens contains one (those containing a special token's
  text are left to the check after sampling when ``skip_special_tokens``); a string that only
  overlaps a special token's text could end a row that vLLM would continue.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mathrl.config import option
from mathrl.tools.formats import PARSER_CHOICES, Tool, check_call
from mathrl.types import Message, Role, ToolCall

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mathrl.rollout.backend import ChatBackend, Sample
    from mathrl.rollout.sampler import TorchSampler
    from mathrl.types import Completion

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "InvalidRequest",
    "LoadLoRAAdapterRequest",
    "ServeConfig",
    "make_app",
    "serve",
]

log = logging.getLogger("mathrl.serve")
T = TypeVar("T")

# = mathrl.models.EMBEDDED_MODEL, spelled out because importing mathrl.models pulls in torch and
# `mathrl serve --help` must stay fast (tests/test_serve.py checks that the two agree).
_EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
# OpenAI's "developer" role is its newer name for "system".
_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_COMPLETION_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default max_tokens for /v1/completions
_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
_GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature
_LOGPROB_FLOOR = -9999.0  # vLLM's (and OpenAI's) stand-in for -inf in JSON


@dataclass(frozen=True)
class ServeConfig:
    """Every knob of ``mathrl serve``."""

    model: str = field(
        default=_EMBEDDED_MODEL,
        metadata=option("HF hub id, local HF directory, mathrl checkpoint or run directory, or the embedded model."),
    )
    host: str = field(default="127.0.0.1", metadata=option("Address to listen on (0.0.0.0 = every interface)."))
    port: int = field(default=8000, metadata=option("TCP port.", min=0, max=65535))
    dtype: Literal["bf16", "fp32"] = field(
        default="fp32", metadata=option("Weights dtype; fp32 keeps greedy replies independent of batching.")
    )
    max_batch: int = field(default=64, metadata=option("Most sequences (requests x n) one model call serves.", min=1))
    served_model_name: str | None = field(
        default=None, metadata=option("Model id clients send and /v1/models lists (default: the model value).")
    )
    max_tokens_limit: int = field(
        default=1024,
        metadata=option("Largest max_tokens a request may ask for; the chat default when it gives none.", min=1),
    )
    num_threads: int | None = field(
        default=None, metadata=option("torch CPU threads (default: all cores; fewer when others share them).", min=1)
    )
    batch_window_ms: float = field(
        default=5.0, metadata=option("An idle server waits this long for more requests to batch.", min=0)
    )
    tool_parser: str = field(
        default="auto",
        metadata=option("Tool-call format: auto (what the chat template writes, else hermes).", choices=PARSER_CHOICES),
    )
    max_loras: int = field(
        default=4,
        metadata=option("Most LoRA adapters loaded at once (each is a merged copy of the model in memory).", min=0),
    )
    allow_weight_updates: bool | None = field(
        default=None,
        metadata=option(
            "Offer /v1/load_lora_adapter, /v1/unload_lora_adapter and /collective_rpc "
            "(default: only when host is a loopback address)."
        ),
    )


class InvalidRequest(Exception):
    """A client mistake, answered with an OpenAI-style error body naming the offending field."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request fields. Those this server does not implement are accepted only with
    their neutral value (checked in :func:`_check_request`); any other field is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator accepts
    stream: bool | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None  # an end-user id for the caller's own logs: changes nothing here
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None


class CompletionRequest(BaseModel):
    """vLLM's ``/v1/completions`` fields (OpenAI's plus its extras). Those below the marker are
    accepted only with their neutral value (:func:`_check_completion`); any other field is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the base model, as vLLM
    prompt: Any = None  # checked by _parse_prompts: ids, lists of ids, a string or strings
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    logprobs: int | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = None
    user: str | None = None  # the caller's end-user id: changes nothing
    cache_salt: str | None = None  # salts vLLM's prefix cache; there is none here
    # --- neutral values only
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int = 0


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's internal id: names are what count here


class CollectiveRPCRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = None


# --- the models requests can name --------------------------------------------------------------


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


# --- queued requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What must be equal for two chat requests to share one model call (stop strings and whether
    tools are offered change where replies end)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    tools: bool = False


@dataclass(frozen=True)
class _Served:
    """A chat request's replies, its prompt length and how many requests its model call served."""

    samples: list[Sample]
    prompt_tokens: int
    batch_requests: int


@dataclass
class _Pending:
    """A queued chat request: its conversation, how many replies, and where the result goes."""

    conversation: tuple[Message, ...]
    n: int
    settings: _Settings
    seed: int
    future: asyncio.Future[Any]
    tools: tuple[Tool, ...] = ()
    model: _Model | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return ("chat", self.model, self.settings)

    @property
    def sequences(self) -> int:
        return self.n

    @staticmethod
    def generate(batch: Sequence[_Pending]) -> list[Any]:
        """One ``backend.generate`` call for the whole batch (worker thread). Tokenizing here, not
        in the event loop, also keeps the (not thread-safe) tokenizer on one thread."""
        model = batch[0].model
        assert model is not None
        backend = model.backend
        conversations, n = _flatten(batch)
        tools = (
            [p.tools for p in batch]
            if len(conversations) == len(batch)
            else [p.tools for p in batch for _ in range(p.n)]
        )
        s = batch[0].settings
        out = backend.generate(
            conversations,
            n=n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seeds=_seeds(batch, n),
            tools=tools,
            stop=s.stop,
        )
        per_request = _unflatten(batch, out, n)
        count = _prompt_counter(backend)
        prompts = [count(p.conversation, p.tools) for p in batch]
        return [_Served(samples, k, len(batch)) for samples, k in zip(per_request, prompts, strict=True)]


@dataclass(frozen=True)
class _TokenSettings:
    """What must be equal for two completions requests to share one sampler call."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]  # what the sampler stops at (see _sampler_stops)


@dataclass(frozen=True)
class _Output:
    """How a completions request wants its choices cut and written (changes no sampled token)."""

    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    include_stop: bool = False
    skip_special: bool = True
    logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_ids: bool = False


@dataclass(frozen=True)
class _Completed:
    """A completions request's choices and token counts."""

    choices: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    batch_requests: int


@dataclass
class _TokenJob:
    """A queued completions request: its prompts (token ids, or text tokenized in the worker)."""

    model: _Model
    prompts: list[list[int] | str]
    add_special_tokens: bool
    n: int
    seed: int
    settings: _TokenSettings
    output: _Output
    context: int | None  # the model's context length, when known
    future: asyncio.Future[Any]

    @property
    def key(self) -> tuple[Any, ...]:
        return ("tokens", self.model, self.settings)

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n

    def token_prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """The prompts as token ids (text tokenized now, in the worker thread), within the context."""
        prompts = []
        for i, p in enumerate(self.prompts):
            ids = p if isinstance(p, list) else list(tokenizer(p, add_special_tokens=self.add_special_tokens).input_ids)
            if not ids:
                raise InvalidRequest(f"prompt[{i}]: tokenizes to no tokens", "prompt")
            if self.context is not None and len(ids) + self.settings.max_tokens > self.context:
                raise InvalidRequest(
                    f"max_tokens: {self.settings.max_tokens} is too large: this model's maximum context length is "
                    f"{self.context} tokens and prompt {i} has {len(ids)} tokens",
                    "max_tokens",
                )
            prompts.append(ids)
        return prompts

    @staticmethod
    def generate(batch: Sequence[_TokenJob]) -> list[Any]:
        """One ``TorchSampler.sample`` call for the rows of every request of the batch (worker
        thread); prompt i sample j of a request seeded s draws from stream s + i * n + j."""
        model = batch[0].model
        sampler = model.sampler
        assert sampler is not None
        tokenizer = sampler.tokenizer
        prepared: list[list[list[int]] | InvalidRequest] = []
        rows: list[list[int]] = []
        seeds: list[int] = []
        for job in batch:
            try:
                prompts = job.token_prompts(tokenizer)
            except InvalidRequest as e:  # this request's mistake: the others of the call go on
                prepared.append(e)
                continue
            prepared.append(prompts)
            for i, p in enumerate(prompts):
                rows += [p] * job.n
                seeds += [job.seed + i * job.n + j for j in range(job.n)]
        s = batch[0].settings
        completions = (
            sampler.sample(
                rows, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=0, row_seeds=seeds,
                stop=list(s.stop),
            )
            if rows
            else []
        )  # fmt: skip
        results: list[Any] = []
        start = 0
        for job, ready in zip(batch, prepared, strict=True):
            if isinstance(ready, InvalidRequest):
                results.append(ready)
                continue
            end = start + len(ready) * job.n
            results.append(_complete(job, ready, completions[start:end], sampler, len(batch)))
            start = end
        return results


_Job = _Pending | _TokenJob


class Batcher:
    """Queues requests and serves them with as few model calls as possible.

    One asyncio task (:meth:`run`) takes batches off the queue; the model runs in a single worker
    thread under a lock, so the event loop stays free to accept (and queue) new requests meanwhile.
    Weight changes (:meth:`exclusive`) run in the same thread, between two calls.
    """

    def __init__(self, max_batch: int, window_s: float):
        self.max_batch = max_batch
        self.window_s = window_s
        self.model_calls = 0
        self._queue: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathrl-generate")

    async def submit(self, job: _Job) -> Any:
        """Queue one request and wait for its result."""
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the model's worker thread, alone (no model call runs meanwhile)."""

        def locked() -> T:
            with self._lock:
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    async def run(self) -> None:
        """Serve queued requests until cancelled; wait ``window_s`` after being idle to gather a burst."""
        while True:
            await self._wakeup.wait()
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while batch := self._take_batch():
                await self._serve(batch)
            self._wakeup.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take_batch(self) -> list[_Job]:
        """Remove and return the oldest live request and the queued ones that can share its call."""
        self._queue = [p for p in self._queue if not p.future.done()]  # drop requests whose client left
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Job] = []
        sequences = 0
        for job in self._queue:
            if job.key == key and (not batch or sequences + job.sequences <= self.max_batch):
                batch.append(job)
                sequences += job.sequences
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    async def _serve(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._generate, batch)
        except Exception as e:  # the model failed: every request of the call gets the error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _generate(self, batch: Sequence[_Job]) -> list[Any]:
        with self._lock:
            self.model_calls += 1
            return batch[0].generate(batch)  # type: ignore[arg-type]  # a batch has one kind (its key)


def _flatten(batch: Sequence[_Pending]) -> tuple[list[tuple[Message, ...]], int]:
    """Conversations and ``n`` for one generate call: as they are when every request has the same
    ``n``, else each conversation repeated ``n`` times with ``n=1`` (the same prompts either way)."""
    ns = {p.n for p in batch}
    if len(ns) == 1:
        return [p.conversation for p in batch], ns.pop()
    return [p.conversation for p in batch for _ in range(p.n)], 1


def _seeds(batch: Sequence[_Pending], n: int) -> list[int]:
    """Per-conversation seeds matching :func:`_flatten`: each request keeps its own random
    streams (sample j of a request seeded s is drawn with seed s + j), whatever it is batched with."""
    if all(p.n == n for p in batch):
        return [p.seed for p in batch]
    return [p.seed + j for p in batch for j in range(p.n)]


def _unflatten(batch: Sequence[_Pending], out: list[list[Sample]], n: int) -> list[list[Sample]]:
    """Each request's ``n`` samples out of a generate call built by :func:`_flatten`."""
    if all(p.n == n for p in batch):  # one row per request already
        return out
    flat = [sample for row in out for sample in row]
    result, start = [], 0
    for p in batch:
        result.append(flat[start : start + p.n])
        start += p.n
    return result


def _prompt_counter(backend: ChatBackend) -> Callable[[Sequence[Message], Sequence[Tool]], int]:
    """Prompt length in tokens for ``usage``, with the backend's renderer when it has one, else 0."""
    renderer = getattr(backend, "renderer", None)
    if renderer is None:
        return lambda conversation, tools: 0
    return lambda conversation, tools: len(renderer.initial_tokens(conversation, tools))


# --- chat requests -------------------------------------------------------------------------------


def _content_text(content: Any, param: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text"}`` parts joined; anything else is a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{param}: expected a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"{param}[{j}]: unsupported content part of type {kind!r}; this server accepts text only",
                f"{param}[{j}].type",
            )
        texts.append(part["text"])
    return "".join(texts)


def _parse_messages(raw: Sequence[dict[str, Any]]) -> tuple[Message, ...]:
    """OpenAI message dicts to :class:`Message` (assistant ``tool_calls`` and ``tool`` messages
    included); a bad role, content or call is a 400 naming the field."""
    messages = []
    for i, m in enumerate(raw):
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: expected one of {', '.join(_ROLES)}, got {role!r}", f"messages[{i}].role"
            )
        calls = _parse_tool_calls(m.get("tool_calls"), f"messages[{i}].tool_calls") if role == "assistant" else ()
        content = m.get("content")
        text = "" if content is None and (calls or role == "tool") else _content_text(content, f"messages[{i}].content")
        call_id = m.get("tool_call_id") or ""
        if not isinstance(call_id, str):
            raise InvalidRequest(f"messages[{i}].tool_call_id: expected a string", f"messages[{i}].tool_call_id")
        messages.append(Message(_ROLES[role], text, tool_calls=calls, tool_call_id=call_id if role == "tool" else ""))
    return tuple(messages)


def _parse_tool_calls(raw: Any, param: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``: functions with JSON-object arguments."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{param}: expected a list", param)
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{param}[{j}].function: expected {{name, arguments}}", f"{param}[{j}].function")
        arguments = function.get("arguments", "{}")
        checked = check_call(function["name"], arguments if isinstance(arguments, str) else None, None)
        if isinstance(checked, str):
            where = f"{param}[{j}].function.arguments"
            raise InvalidRequest(f"{where}: expected a JSON object in a string", where)
        calls.append(ToolCall(checked.name, arguments, str(call.get("id") or f"call_{j}")))
    return tuple(calls)


def _parse_tools(raw: Sequence[dict[str, Any]] | None, choice: Any) -> tuple[Tool, ...]:
    """The request's function tools (none when ``tool_choice`` is "none")."""
    if choice not in (None, "auto", "none"):
        raise InvalidRequest(
            "tool_choice: this server supports 'auto' and 'none' (the model decides whether to call a tool)",
            "tool_choice",
        )
    if not raw or choice == "none":
        return ()
    tools = []
    for i, spec in enumerate(raw):
        function = spec.get("function") if isinstance(spec, dict) and spec.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}]: expected {{type: function, function: {{name, ...}}}}", f"tools[{i}]")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters: expected a JSON schema object", f"tools[{i}]")
        tools.append(Tool(function["name"], str(function.get("description") or ""), parameters))
    return tuple(tools)


def _settings(req: ChatCompletionRequest, max_tokens_limit: int) -> _Settings:
    """Sampling settings with OpenAI's defaults; ``max_completion_tokens`` wins over ``max_tokens``."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_limit
    if max_tokens > max_tokens_limit:
        raise InvalidRequest(f"{param}: {max_tokens} is over this server's limit of {max_tokens_limit}", param)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None or temperature == 0 else req.top_p  # greedy ignores top_p: batch freely
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise InvalidRequest("stop: up to 4 non-empty strings", "stop")
    return _Settings(max_tokens, temperature, top_p, stop, bool(req.tools) and req.tool_choice != "none")


def _check_request(req: ChatCompletionRequest, max_batch: int) -> None:
    """The checks pydantic's field constraints do not express (the model is checked by _Registry.get)."""
    if req.stream:
        raise InvalidRequest("stream: streaming is not supported by this server; send stream=false", "stream")
    unsupported = {
        "logprobs": req.logprobs is True,
        "top_logprobs": req.top_logprobs is not None,
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "logit_bias": bool(req.logit_bias),
        "response_format": req.response_format is not None and req.response_format.get("type") != "text",
        "stream_options": req.stream_options is not None,
    }
    for name, used in unsupported.items():
        if used:
            raise InvalidRequest(f"{name}: not supported by this server; leave it out (or at its default)", name)
    if (req.n or 1) > max_batch:
        raise InvalidRequest(f"n: {req.n} is over this server's max_batch of {max_batch}", "n")


def _completion_body(model_id: str, served: _Served) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object. Each choice also carries ``completion_tokens``, its own
    token count (an extension, ignored by OpenAI clients, read by OpenAIBackend)."""
    choices = [
        {
            "index": i,
            "message": _reply_message(s),
            "finish_reason": "tool_calls" if s.tool_calls else s.finish_reason,
            "logprobs": None,
            "completion_tokens": s.num_tokens,
        }
        for i, s in enumerate(served.samples)
    ]
    completion = sum(s.num_tokens for s in served.samples)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": served.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": served.prompt_tokens + completion,
        },
    }


def _reply_message(sample: Sample) -> dict[str, Any]:
    """The assistant message of a choice; tool calls in OpenAI's shape (arguments as a JSON string)."""
    if not sample.tool_calls:
        return {"role": "assistant", "content": sample.text}
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in sample.tool_calls
    ]
    return {"role": "assistant", "content": sample.text or None, "tool_calls": calls}


# --- completions requests ------------------------------------------------------------------------


def _check_completion(req: CompletionRequest, max_batch: int, max_tokens_limit: int) -> None:
    """What pydantic's field constraints do not express: fields at anything but their neutral value."""
    unsupported = {
        "stream": bool(req.stream),
        "stream_options": req.stream_options is not None,
        "echo": bool(req.echo),
        "suffix": req.suffix is not None,
        "best_of": req.best_of is not None and (req.best_of != 1 or req.n != 1),
        "logit_bias": bool(req.logit_bias),
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "repetition_penalty": req.repetition_penalty not in (None, 1.0),
        "top_k": req.top_k not in (None, 0, -1),
        "min_p": bool(req.min_p),
        "min_tokens": req.min_tokens != 0,
        "ignore_eos": req.ignore_eos,
        "use_beam_search": req.use_beam_search,
        "length_penalty": req.length_penalty != 1.0,
        "spaces_between_special_tokens": not req.spaces_between_special_tokens,
        "truncate_prompt_tokens": req.truncate_prompt_tokens is not None,
        "allowed_token_ids": req.allowed_token_ids is not None,
        "prompt_logprobs": req.prompt_logprobs is not None,
        "bad_words": bool(req.bad_words),
        "response_format": req.response_format is not None and req.response_format.get("type") != "text",
        "structured_outputs": req.structured_outputs is not None,
        "priority": req.priority != 0,
    }
    for name, used in unsupported.items():
        if used:
            raise InvalidRequest(f"{name}: not supported by this server; leave it out (or at its default)", name)
    if req.logprobs is not None and not 0 <= req.logprobs <= _MAX_LOGPROBS:
        raise InvalidRequest(
            f"logprobs: {req.logprobs} is not supported; this server returns 0 to {_MAX_LOGPROBS} top logprobs",
            "logprobs",
        )
    if req.n > max_batch:
        raise InvalidRequest(f"n: {req.n} is over this server's max_batch of {max_batch}", "n")
    if (req.max_tokens or 0) > max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens: {req.max_tokens} is over this server's limit of {max_tokens_limit}", "max_tokens"
        )
    if req.stop is not None and any(not s for s in ([req.stop] if isinstance(req.stop, str) else req.stop)):
        raise InvalidRequest("stop: stop strings must not be empty", "stop")


def _parse_prompts(raw: Any, vocab_size: int) -> list[list[int] | str]:
    """vLLM's prompt forms: token ids, a list of token-id lists, a string, a list of strings."""
    expected = "prompt: expected a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_token(t) for t in raw)):
        raw = [raw]  # one prompt
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(expected if raw != [] else "prompt: must not be empty", "prompt")
    prompts: list[list[int] | str] = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if not p:
                raise InvalidRequest(f"prompt[{i}]: must not be empty", "prompt")
            prompts.append(p)
        elif isinstance(p, list) and p and all(_is_token(t) for t in p):
            if (bad := next((t for t in p if not 0 <= t < vocab_size), None)) is not None:
                raise InvalidRequest(
                    f"prompt[{i}]: token id {bad} is out of vocabulary (0..{vocab_size - 1})", "prompt"
                )
            prompts.append([int(t) for t in p])
        else:
            raise InvalidRequest(expected if p != [] else f"prompt[{i}]: must not be empty", "prompt")
    if len({type(p) for p in prompts}) > 1:
        raise InvalidRequest(expected + ", not a mix", "prompt")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampler_stops(stop: Sequence[str], skip_special: bool, special_texts: Sequence[str]) -> tuple[str, ...]:
    """The stop strings the sampler may end rows at. It matches them in text decoded with special
    tokens, vLLM in the text it returns: with ``skip_special_tokens`` a stop string containing a
    special token's text never matches there, so the sampler must not stop at it either."""
    if not skip_special:
        return tuple(sorted(set(stop)))
    return tuple(sorted({s for s in stop if not any(t and t in s for t in special_texts)}))


class _Decoder:
    """Token ids to text as vLLM's detokenizer makes it: the prompt's last tokens as context (so a
    SentencePiece leading space survives), special tokens skipped or not, no space clean-up."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: Sequence[int], skip_special: bool):
        self.tokenizer, self.context, self.skip = tokenizer, list(prompt[-4:]), skip_special
        self.base = self._decode(self.context)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=self.skip, clean_up_tokenization_spaces=False))

    def __call__(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        full = self._decode([*self.context, *ids])
        return full[len(self.base) :] if full.startswith(self.base) else self._decode(ids)


def _first_stop(text: str, stop: Sequence[str]) -> tuple[str, int] | None:
    """The stop string that ends earliest in ``text`` (ties: the first listed) and where it starts."""
    best: tuple[int, str, int] | None = None
    for s in stop:
        start = text.find(s)
        if start >= 0 and (best is None or start + len(s) < best[0]):
            best = (start + len(s), s, start)
    return None if best is None else (best[1], best[2])


def _cut(
    tokens: Sequence[int], finish: str, text_of: Callable[[Sequence[int]], str], out: _Output, eos: frozenset[int]
) -> tuple[list[int], str, str, int | str | None]:
    """Where vLLM ends a sampled row: (token ids, text, finish_reason, stop_reason).

    An EOS or stop token ends it (kept in the ids, left out of the text unless
    ``include_stop_str_in_output``); a stop string ends it at the token that completes it (the ids
    keep that token, the text stops before the string or, with ``include_stop_str_in_output``, after it).
    """
    ids = list(tokens)
    stop_reason: int | str | None = None
    end = next((k for k, t in enumerate(ids) if t in eos or t in out.stop_token_ids), None)
    if end is not None:
        ids, finish = ids[: end + 1], "stop"
        stop_reason = None if ids[end] in eos else ids[end]
    shown = ids[:-1] if end is not None and not out.include_stop else ids
    text = text_of(shown)
    if out.stop and _first_stop(text, out.stop) is not None:
        lo, hi = 1, len(shown)  # the first prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(text_of(shown[:mid]), out.stop) is not None:
                hi = mid
            else:
                lo = mid + 1
        ids, text = ids[:lo], text_of(shown[:lo])
        hit = _first_stop(text, out.stop)
        assert hit is not None
        s, start = hit
        text = text[: start + len(s)] if out.include_stop else text[:start]
        finish, stop_reason = "stop", s
    return ids, text, finish, stop_reason


def _complete(
    job: _TokenJob, prompts: list[list[int]], completions: Sequence[Completion], sampler: TorchSampler, calls: int
) -> _Completed:
    """The choices of one completions request from its rows' completions (worker thread)."""
    tokenizer = sampler.tokenizer
    eos = frozenset(int(t) for t in sampler.eos_token_ids.tolist())
    out = job.output
    token_text: dict[int, str] = {}
    choices = []
    completion_tokens = 0
    for k, c in enumerate(completions):
        prompt = prompts[k // job.n]
        decoder = _Decoder(tokenizer, prompt, out.skip_special)
        ids, text, finish, stop_reason = _cut(c.tokens_T, c.finish_reason, decoder, out, eos)
        logprobs = None
        if out.logprobs is not None:
            top = (
                _top_logprobs(sampler.model, prompt, ids, out.logprobs, job.settings.temperature, job.settings.top_p)
                if out.logprobs > 0 and ids
                else None
            )
            logprobs = _logprobs_body(ids, c.logprobs_T[: len(ids)], top, tokenizer, token_text, out.tokens_as_ids)
        choices.append(
            {
                "index": k,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": ids if out.return_token_ids else None,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt if out.return_token_ids else None,
            }
        )
        completion_tokens += len(ids)
    return _Completed(choices, sum(len(p) for p in prompts), completion_tokens, calls)


def _top_logprobs(
    model: PreTrainedModel, prompt: Sequence[int], ids: Sequence[int], k: int, temperature: float, top_p: float
) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely tokens at each sampled position, with their logprobs in the distribution
    the sampler drew from (temperature, then top-p renormalised; greedy: temperature 1): one forward
    pass over the prompt and the sampled tokens."""
    import torch

    with torch.inference_mode():
        input_ids = torch.tensor([[*prompt, *ids[:-1]]], device=model.device)
        logits_TV = model(input_ids=input_ids, logits_to_keep=len(ids)).logits[0].float()
        if temperature > 0 and temperature != 1.0:
            logits_TV = logits_TV / temperature
        logp_TV = torch.log_softmax(logits_TV, dim=-1)
        if temperature > 0 and top_p < 1.0:
            logp_TV = _nucleus(logp_TV, top_p)
        values_TK, indices_TK = logp_TV.topk(k, dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(indices_TK.tolist(), values_TK.tolist(), strict=True)]


def _nucleus(logp_TV: torch.Tensor, top_p: float) -> torch.Tensor:
    """TorchSampler's top-p cut: keep the smallest set of most likely tokens whose mass reaches
    ``top_p`` and renormalise (the rest become -inf)."""
    import torch

    sorted_TV, order_TV = logp_TV.sort(dim=-1, descending=True)
    mass_before_TV = sorted_TV.exp().cumsum(dim=-1) - sorted_TV.exp()
    drop_TV = torch.zeros_like(logp_TV, dtype=torch.bool).scatter(-1, order_TV, mass_before_TV >= top_p)
    return torch.log_softmax(logp_TV.masked_fill(drop_TV, float("-inf")), dim=-1)


def _logprobs_body(
    ids: Sequence[int],
    logprobs: Sequence[float],
    top: list[list[tuple[int, float]]] | None,
    tokenizer: PreTrainedTokenizerBase,
    cache: dict[int, str],
    as_ids: bool,
) -> dict[str, Any]:
    """vLLM's completion ``logprobs`` object: each token's string, its logprob, a dict of the sampled
    token and the top alternatives (string -> logprob), and character offsets (sums of token lengths)."""

    def text(t: int) -> str:
        if as_ids:
            return f"token_id:{t}"
        if t not in cache:
            cache[t] = str(tokenizer.decode([t]))
        return cache[t]

    tokens = [text(t) for t in ids]
    token_logprobs = [max(lp, _LOGPROB_FLOOR) for lp in logprobs]
    top_logprobs = []
    for pos, (t, lp) in enumerate(zip(ids, token_logprobs, strict=True)):
        entry = {tokens[pos]: lp}
        for alt, alt_lp in top[pos] if top is not None else ():
            if alt != t:
                entry[text(alt)] = max(alt_lp, _LOGPROB_FLOOR)
        top_logprobs.append(entry)
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


# --- weight updates ------------------------------------------------------------------------------


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the app -------------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint as an OpenAI error: ``param`` is the field path, e.g. ``messages[0]``."""
    first = exc.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None)
    if first.get("type") == "extra_forbidden":
        return _error(400, f"{param}: this server does not support the request field {param!r}; leave it out", param)
    if param is None:
        return _error(400, "the request body must be a JSON object", None)
    return _error(400, f"{param}: {first.get('msg', 'invalid value')}", param)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404 route, 405 method, bad JSON), in OpenAI's shape."""

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None)


def _install_request_log(app: FastAPI) -> None:
    """One log line per request: method, path, status, tokens (completions), seconds."""

    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        request.state.log_extra = ""
        response = await call_next(request)
        seconds = time.perf_counter() - start
        log.info(
            "%s %s %d%s %.2fs", request.method, request.url.path, response.status_code, request.state.log_extra, seconds
        )
        return response


def _model_card(model: _Model) -> dict[str, Any]:
    """vLLM's model card: adapters name their base as ``parent`` and their path as ``root``."""
    sampler = model.sampler
    max_len = getattr(sampler.model.config, "max_position_embeddings", None) if sampler is not None else None
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "mathrl",
        "root": model.root,
        "parent": model.parent,
        "max_model_len": max_len if model.adapter is None else None,
    }


def make_app(
    backend: ChatBackend,
    model_id: str,
    *,
    max_batch: int = 64,
    max_tokens_limit: int = 1024,
    batch_window_s: float = 0.005,
    max_loras: int = 4,
    weight_updates: bool = True,
    root: str | None = None,
) -> FastAPI:
    """The ASGI app serving ``backend`` as ``model_id``; run it with any ASGI server (uvicorn).
    ``/v1/completions`` and adapters need a backend with a ``sampler`` (a LocalBackend);
    ``weight_updates=False`` answers 403 on the endpoints that change weights."""
    registry = _Registry(_Model(model_id, backend, int(time.time()), root=root or model_id), max_loras)
    base_sampler = registry.base.sampler
    vocab_size = len(base_sampler.tokenizer) if base_sampler is not None else 0
    special_texts = getattr(getattr(backend, "renderer", None), "special_texts", None) or (
        list(base_sampler.tokenizer.all_special_tokens) if base_sampler is not None else []
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(max_batch, batch_window_s)  # created here: it binds to the serving loop
        task = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        try:
            yield
        finally:
            task.cancel()
            batcher.close()

    app = FastAPI(title="mathrl serve", lifespan=lifespan)
    app.state.registry = registry
    _install_error_handlers(app)
    _install_request_log(app)

    def check_weight_updates(path: str) -> None:
        if not weight_updates:
            raise InvalidRequest(
                f"{path}: weight updates are off on this server (it listens beyond loopback); "
                "start it with allow_weight_updates=true to allow them",
                None,
                status=403,
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in registry.models.values()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> dict[str, Any] | JSONResponse:
        _check_request(req, max_batch)
        model = registry.get(req.model)
        conversation = _parse_messages(req.messages)
        tools = _parse_tools(req.tools, req.tool_choice)
        settings = _settings(req, max_tokens_limit)
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        future = asyncio.get_running_loop().create_future()
        try:
            served = await request.app.state.batcher.submit(
                _Pending(conversation, req.n or 1, settings, seed, future, tools, model)
            )
        except InvalidRequest:
            raise
        except Exception as e:  # a bug or an out-of-memory in the model: the client gets a 500 with the reason
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}", None)
        body = _completion_body(model.name, served)
        usage = body["usage"]
        request.state.log_extra = (
            f" n={req.n or 1} prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}"
            f" batch={served.batch_requests}"
        )
        return body

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> dict[str, Any] | JSONResponse:
        _check_completion(req, max_batch, max_tokens_limit)
        model = registry.get(req.model)
        sampler = model.sampler
        if sampler is None:
            raise InvalidRequest("/v1/completions: this server's backend has no token sampler", None, status=501)
        prompts = _parse_prompts(req.prompt, vocab_size)
        temperature = 1.0 if req.temperature is None else req.temperature
        temperature = 0.0 if temperature < _GREEDY_BELOW else temperature
        top_p = 1.0 if req.top_p is None or temperature == 0 else req.top_p  # greedy ignores top_p: batch freely
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        max_tokens = req.max_tokens or min(_COMPLETION_MAX_TOKENS, max_tokens_limit)
        settings = _TokenSettings(
            max_tokens, temperature, top_p, _sampler_stops(stop, req.skip_special_tokens, special_texts)
        )
        output = _Output(
            stop=stop,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
            include_stop=req.include_stop_str_in_output,
            skip_special=req.skip_special_tokens,
            logprobs=req.logprobs,
            return_token_ids=bool(req.return_token_ids),
            tokens_as_ids=bool(req.return_tokens_as_token_ids),
        )
        context = getattr(sampler.model.config, "max_position_embeddings", None)
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        future = asyncio.get_running_loop().create_future()
        job = _TokenJob(model, prompts, req.add_special_tokens, req.n, seed, settings, output, context, future)
        try:
            done: _Completed = await request.app.state.batcher.submit(job)
        except InvalidRequest:
            raise
        except Exception as e:  # a bug or an out-of-memory in the model: the client gets a 500 with the reason
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}", None)
        request.state.log_extra = (
            f" prompts={len(prompts)} n={req.n} prompt_tokens={done.prompt_tokens}"
            f" completion_tokens={done.completion_tokens} batch={done.batch_requests}"
        )
        return {
            "id": f"cmpl-{req.request_id or uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": done.choices,
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
            "system_fingerprint": None,
        }

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
        check_weight_updates("/v1/load_lora_adapter")
        if req.is_3d_lora_weight:
            raise InvalidRequest("is_3d_lora_weight: not supported by this server; leave it out", "is_3d_lora_weight")
        registry.check_load(req)  # fail fast; checked again in the worker
        await request.app.state.batcher.exclusive(lambda: _load_adapter(registry, req))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_weight_updates("/v1/unload_lora_adapter")
        registry.remove(req.lora_name)  # queued requests that named it keep their copy until they finish
        log.info("unloaded LoRA adapter %r", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/collective_rpc")
    async def collective_rpc(req: CollectiveRPCRequest, request: Request) -> dict[str, Any]:
        check_weight_updates("/collective_rpc")
        if req.method != "reload_weights":
            raise InvalidRequest(f"method: this server implements only 'reload_weights', not {req.method!r}", "method")
        if req.args:
            raise InvalidRequest("args: reload_weights takes its arguments as kwargs", "args")
        if req.timeout is not None:
            raise InvalidRequest("timeout: not supported by this server; leave it out", "timeout")
        for key, value in req.kwargs.items():
            if key not in ("weights_path", "is_checkpoint_format") or (
                key == "is_checkpoint_format" and value is not True
            ):
                raise InvalidRequest(f"kwargs.{key}: not supported by this server; leave it out", f"kwargs.{key}")
        weights_path = req.kwargs.get("weights_path")
        if not isinstance(weights_path, str) or not weights_path:
            raise InvalidRequest(
                "kwargs.weights_path: reload_weights needs the directory of the new weights", "kwargs.weights_path"
            )
        await request.app.state.batcher.exclusive(lambda: _reload_weights(registry, weights_path))
        return {"results": [None]}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(reset_running_requests: bool = False, reset_external: bool = False) -> dict[str, bool]:
        return {"success": True}  # no cache outlives a model call here

    return app


def serve(cfg: ServeConfig) -> None:
    """Load ``cfg.model`` and serve it until interrupted (Ctrl-C)."""
    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    from mathrl.rollout.backend import LocalBackend

    hf_logging.disable_progress_bar()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    start = time.perf_counter()
    backend = LocalBackend.load(cfg.model, dtype, max_batch=cfg.max_batch, tool_parser=cfg.tool_parser)
    model_id = cfg.served_model_name or cfg.model
    log.info("loaded %s (%s) in %.1fs; serving it as %r", cfg.model, cfg.dtype, time.perf_counter() - start, model_id)
    weight_updates = cfg.allow_weight_updates if cfg.allow_weight_updates is not None else _is_loopback(cfg.host)
    if weight_updates and not _is_loopback(cfg.host):
        log.warning(
            "weight updates are on while listening on %s: anyone who reaches the port can swap the weights", cfg.host
        )
    app = make_app(
        backend,
        model_id,
        max_batch=cfg.max_batch,
        max_tokens_limit=cfg.max_tokens_limit,
        batch_window_s=cfg.batch_window_ms / 1000,
        max_loras=cfg.max_loras,
        weight_updates=weight_updates,
        root=cfg.model,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=False, log_level="info")
