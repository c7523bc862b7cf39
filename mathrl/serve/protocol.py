"""What ``mathrl serve`` is configured with and what clients send: :class:`ServeConfig`, the request
bodies (pydantic models that refuse unknown fields), :class:`InvalidRequest`, and vLLM's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathrl import EMBEDDED_MODEL as _EMBEDDED_MODEL
from mathrl.config import option
from mathrl.tools.formats import PARSER_CHOICES
from mathrl.types import Role

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
    their neutral value (checked in :func:`.chat._check_request`); any other field is a 400."""

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
    accepted only with their neutral value (:func:`.completions._check_completion`); any other field is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the base model, as vLLM
    prompt: Any = None  # checked by completions._parse_prompts: ids, lists of ids, a string or strings
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
