"""``/v1/chat/completions``: messages and tools parsed and checked, the queued request and its one
``backend.generate`` call per batch, and the ``chat.completion`` body."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mathrl.serve.protocol import _ROLES, ChatCompletionRequest, InvalidRequest
from mathrl.serve.registry import _Model
from mathrl.tools.formats import Tool, check_call
from mathrl.types import Message, ToolCall

if TYPE_CHECKING:
    from mathrl.rollout.backend import ChatBackend, Sample

# --- queued chat requests ------------------------------------------------------------------------


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
