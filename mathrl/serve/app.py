"""The FastAPI app (routes, OpenAI-shaped errors, one log line per request) and ``serve``, which
loads the model and runs it under uvicorn."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mathrl.serve.batching import Batcher
from mathrl.serve.chat import _check_request, _completion_body, _parse_messages, _parse_tools, _Pending, _settings
from mathrl.serve.completions import (
    _check_completion,
    _Completed,
    _Output,
    _parse_prompts,
    _sampler_stops,
    _TokenJob,
    _TokenSettings,
)
from mathrl.serve.protocol import (
    _COMPLETION_MAX_TOKENS,
    _GREEDY_BELOW,
    ChatCompletionRequest,
    CollectiveRPCRequest,
    CompletionRequest,
    InvalidRequest,
    LoadLoRAAdapterRequest,
    ServeConfig,
    UnloadLoRAAdapterRequest,
)
from mathrl.serve.registry import _Model, _Registry
from mathrl.serve.weights import _load_adapter, _reload_weights

if TYPE_CHECKING:
    from mathrl.rollout.backend import ChatBackend

log = logging.getLogger("mathrl.serve")  # one logger for the whole package


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
