"""``mathrl serve``: an OpenAI-compatible chat server for any model mathrl can load.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming) and ``GET /health``.

Tools: a request's ``tools`` are rendered into the prompt (natively by a template with tool
support, else described in the system message in ``tool_parser``'s format, see
:mod:`mathrl.rollout.renderer`), ``role: "tool"`` messages and assistant ``tool_calls`` in the
history are accepted, and a reply that calls a tool comes back as OpenAI ``tool_calls`` with
``finish_reason: "tool_calls"``. Every request field is either honoured or refused with a 400
naming it (``logprobs``, penalties, ``logit_bias``, ``response_format``, ``tool_choice`` other
than auto/none, ``stream``...): a client never gets a silently different result.
Any OpenAI client works against it, and so does :class:`mathrl.rollout.openai_backend.OpenAIBackend`,
which lets ``mathrl eval`` / ``distill`` run against a served checkpoint (or vLLM, or OpenAI).

How generation is scheduled. The model is blocking torch code, so it runs in one dedicated worker
thread, never in the event loop, and a lock makes sure two model calls never overlap. Requests are
queued; each model call takes the oldest queued request and every other queued request with the same
sampling settings (``max_tokens``, ``temperature``, ``top_p``), up to ``max_batch`` sequences, and
serves them all with ONE ``backend.generate`` call: on a CPU a batch of 8 costs little more than a
single prompt. Requests that arrive while the model is busy wait for the next call; an idle server
waits ``batch_window_ms`` after the first request so a burst of concurrent requests shares one call.
Requests with different ``n`` share a call too (each conversation is repeated ``n`` times).

What is guaranteed about reproducibility:
- temperature 0 (greedy) ignores the seed. The server never changes a request's own prompt, only
  what it is batched with. With ``dtype=fp32`` greedy replies were identical batched and unbatched in
  our tests; with ``dtype=bf16`` they can differ (the sampler computes the prefix shared by a batch
  once and pads the rest, and bf16 rounding depends on those shapes): prefer fp32 when exact
  reproducibility matters (on a CPU it is also the faster one).
- temperature > 0: every request draws from its own random streams (sample j of a request with
  seed s uses seed s + j), so its reply does not depend on what it is batched with; a request
  without a seed gets a random one. Same seed, same reply (up to the dtype note above).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mathrl.config import option
from mathrl.tools.formats import PARSER_CHOICES, Tool, check_call
from mathrl.types import Message, Role, ToolCall

if TYPE_CHECKING:
    from mathrl.rollout.backend import ChatBackend, Sample

__all__ = ["ChatCompletionRequest", "InvalidRequest", "ServeConfig", "make_app", "serve"]

log = logging.getLogger("mathrl.serve")

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
        metadata=option("Largest max_tokens a request may ask for; the default when it gives none.", min=1),
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


@dataclass(frozen=True)
class _Settings:
    """What must be equal for two requests to share one model call (stop strings and whether
    tools are offered change where replies end)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    tools: bool = False


@dataclass
class _Pending:
    """A queued request: its conversation, how many replies, and where the result goes."""

    conversation: tuple[Message, ...]
    n: int
    settings: _Settings
    seed: int
    future: asyncio.Future[_Served]
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class _Served:
    """A request's replies, its prompt length and how many requests its model call served."""

    samples: list[Sample]
    prompt_tokens: int
    batch_requests: int


class Batcher:
    """Queues requests and serves them with as few ``backend.generate`` calls as possible.

    One asyncio task (:meth:`run`) takes batches off the queue; the model runs in a single worker
    thread under a lock, so the event loop stays free to accept (and queue) new requests meanwhile.
    """

    def __init__(self, backend: ChatBackend, max_batch: int, window_s: float):
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self.model_calls = 0
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathrl-generate")
        self._count_prompt = _prompt_counter(backend)

    async def submit(
        self, conversation: tuple[Message, ...], n: int, settings: _Settings, seed: int, tools: tuple[Tool, ...] = ()
    ) -> _Served:
        """Queue one request and wait for its replies."""
        future: asyncio.Future[_Served] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(conversation, n, settings, seed, future, tools))
        self._wakeup.set()
        return await future

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

    def _take_batch(self) -> list[_Pending]:
        """Remove and return the oldest live request and the queued ones that can share its call."""
        self._queue = [p for p in self._queue if not p.future.done()]  # drop requests whose client left
        if not self._queue:
            return []
        settings = self._queue[0].settings
        batch: list[_Pending] = []
        sequences = 0
        for pending in self._queue:
            if pending.settings == settings and (not batch or sequences + pending.n <= self.max_batch):
                batch.append(pending)
                sequences += pending.n
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    async def _serve(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._generate, batch)
        except Exception as e:  # the model failed: every request of the call gets the error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _generate(self, batch: list[_Pending]) -> list[_Served]:
        """One model call for the whole batch (worker thread). Tokenizing here, not in the event
        loop, also keeps the (not thread-safe) tokenizer on one thread."""
        with self._lock:
            self.model_calls += 1
            conversations, n = _flatten(batch)
            tools = (
                [p.tools for p in batch]
                if len(conversations) == len(batch)
                else [p.tools for p in batch for _ in range(p.n)]
            )
            s = batch[0].settings
            out = self.backend.generate(
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
            prompts = [self._count_prompt(p.conversation, p.tools) for p in batch]
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


def _check_request(req: ChatCompletionRequest, model_id: str, max_batch: int) -> None:
    """The checks pydantic's field constraints do not express."""
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
    if req.model != model_id:
        raise InvalidRequest(
            f"model: the model {req.model!r} does not exist; this server serves {model_id!r}",
            "model",
            status=404,
            code="model_not_found",
        )
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
    """One log line per request: method, path, status, tokens (chat completions), seconds."""

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


def make_app(
    backend: ChatBackend,
    model_id: str,
    *,
    max_batch: int = 64,
    max_tokens_limit: int = 1024,
    batch_window_s: float = 0.005,
) -> FastAPI:
    """The ASGI app serving ``backend`` as ``model_id``; run it with any ASGI server (uvicorn)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(backend, max_batch, batch_window_s)  # created here: it binds to the serving loop
        task = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        try:
            yield
        finally:
            task.cancel()
            batcher.close()

    app = FastAPI(title="mathrl serve", lifespan=lifespan)
    created = int(time.time())
    _install_error_handlers(app)
    _install_request_log(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "mathrl"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> dict[str, Any] | JSONResponse:
        _check_request(req, model_id, max_batch)
        conversation = _parse_messages(req.messages)
        tools = _parse_tools(req.tools, req.tool_choice)
        settings = _settings(req, max_tokens_limit)
        try:
            served = await request.app.state.batcher.submit(
                conversation, req.n or 1, settings, req.seed if req.seed is not None else secrets.randbits(62), tools
            )
        except Exception as e:  # a bug or an out-of-memory in the model: the client gets a 500 with the reason
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}", None)
        body = _completion_body(model_id, served)
        usage = body["usage"]
        request.state.log_extra = (
            f" n={req.n or 1} prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}"
            f" batch={served.batch_requests}"
        )
        return body

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
    app = make_app(
        backend,
        model_id,
        max_batch=cfg.max_batch,
        max_tokens_limit=cfg.max_tokens_limit,
        batch_window_s=cfg.batch_window_ms / 1000,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=False, log_level="info")
