"""A :class:`~mathrl.rollout.sampler.Sampler` on an inference server: vLLM, or ``mathrl serve``.

The server speaks vLLM's OpenAI-compatible dialect: ``POST /v1/completions`` takes token-id
prompts and, with ``return_token_ids``, returns each choice's generated ``token_ids`` with
``logprobs.token_logprobs`` aligned to them. The trainer never decodes and re-encodes what
was sampled: the token ids come back as they were drawn.

Sampling. Identical prompts of a call become one prompt with ``n``; prompts with the same
``n`` go in one request (a list of token-id prompts; choice ``i * n + j`` is prompt i's
sample j), so a training step is one or a few requests the server batches as it likes.
With ``row_seeds`` (evaluation) each row is its own request with its own seed, so its
sample does not depend on what else is sampled. Requests run concurrently (``concurrency``)
and are retried on connection errors and 5xx (:class:`OpenAIBackend`'s retry loop).

Weight updates (:meth:`RemoteSampler.update_weights`), always written completely before the
server hears of them (a temporary directory renamed into place):
- LoRA: version v's adapter is saved to ``weights_dir/v{v:06d}`` and loaded as a new adapter
  ``{api_model}-v{v}`` (``POST /v1/load_lora_adapter``); later requests name it. Requests in
  flight keep the adapter they named, so sampling can overlap an update. Versions that can no
  longer be asked for (all but the newest ``keep_versions``) are unloaded
  (``POST /v1/unload_lora_adapter``) and their files deleted. A new name per version, not
  ``load_inplace``: a name always means the same weights, in the server's caches too.
- Full weights: saved (bf16 safetensors) to ``weights_dir/full-v{v:06d}``, then
  ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": ...}}`` and
  ``POST /reset_prefix_cache`` (vLLM needs ``VLLM_SERVER_DEV_MODE=1`` for both). The served
  name stays, so a reload waits until no request is in flight and holds new ones back until
  it is done: no sample mixes two versions.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from mathrl.rollout.openai_backend import OpenAIBackend, OpenAIBackendError, _run_sync
from mathrl.types import Completion, FinishReason

__all__ = ["RemoteSampler", "check_server"]


class RemoteSampler:
    """Token-in, token-out sampling and weight pushes against an inference server (see module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        weights_dir: Path,
        *,
        lora: bool,
        keep_versions: int = 2,
        concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 3,
    ):
        self.api = OpenAIBackend(base_url, model, concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries)
        base = self.api.base_url
        self.root = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.served = model  # what requests name: the base, then the newest adapter
        self.weights_dir = weights_dir
        self.lora = lora
        self.keep_versions = max(1, keep_versions)
        self.version = 0
        self._loaded: list[tuple[str, Path]] = []  # adapters on the server, oldest first
        self._in_flight = 0
        self._idle = threading.Condition()

    # --- sampling ------------------------------------------------------------------------
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        top_p: float = 1.0,
        row_seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[Completion]:
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(prompts)} prompts")
        with self._idle:
            self._in_flight += 1
        try:
            return _run_sync(self._sample(prompts, max_tokens, temperature, seed, top_p, row_seeds, stop))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    async def _sample(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float,
        seed: int,
        top_p: float,
        row_seeds: Sequence[int] | None,
        stop: Sequence[str],
    ) -> list[Completion]:
        requests = _plan(prompts, seed, row_seeds)
        model = self.served
        payload: dict[str, Any] = {
            "model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
        }  # fmt: skip
        if stop:
            payload |= {"stop": list(stop), "include_stop_str_in_output": True}
        results: list[Completion | None] = [None] * len(prompts)
        semaphore = asyncio.Semaphore(self.api.concurrency)
        async with httpx.AsyncClient(timeout=self.api.timeout_s) as client:

            async def one(request: _Request) -> None:
                async with semaphore:
                    body = await self.api._post(
                        client,
                        {**payload, "prompt": [list(p) for p in request.prompts], "n": request.n, "seed": request.seed},
                        url=f"{self.api.base_url}/completions",
                    )
                choices = body.get("choices")
                if not isinstance(choices, list) or len(choices) != len(request.rows):
                    raise OpenAIBackendError(
                        f"{self.api.base_url}/completions: asked for {len(request.rows)} choices, "
                        f"got {len(choices) if isinstance(choices, list) else 'none'}"
                    )
                for choice in choices:
                    results[request.rows[int(choice["index"])]] = _completion(choice, self.api.base_url)

            await asyncio.gather(*(one(r) for r in requests))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # --- weights ---------------------------------------------------------------------------
    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Write ``policy``'s weights for ``version`` and make the server sample from them."""
        from mathrl.models import base_of, unwrap

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        if self.lora:
            name = f"{self.model}-v{version}"
            folder = _write_atomically(self.weights_dir / f"v{version:06d}", unwrap(policy).save_pretrained)
            self._admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())})
            self._loaded.append((name, folder))
            self.served, self.version = name, version
            while len(self._loaded) > self.keep_versions:
                old, old_folder = self._loaded.pop(0)
                self._admin("/v1/unload_lora_adapter", {"lora_name": old})
                shutil.rmtree(old_folder, ignore_errors=True)
            return
        model = base_of(policy)
        state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
        folder = _write_atomically(
            self.weights_dir / f"full-v{version:06d}", lambda d: model.save_pretrained(d, state_dict=state)
        )
        with self._idle:  # no request in flight while the served weights change
            self._idle.wait_for(lambda: self._in_flight == 0)
            self._admin(
                "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder.resolve())}}
            )
            self._admin("/reset_prefix_cache", {})
            self.version = version
        for stale in self.weights_dir.glob("full-v*"):
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)

    def _admin(self, path: str, payload: dict[str, Any]) -> None:
        async def post() -> None:
            async with httpx.AsyncClient(timeout=self.api.timeout_s) as client:
                await self.api._post(client, payload, url=f"{self.root}{path}", json_reply=False)

        _run_sync(post())


def check_server(base_url: str, model: str, timeout_s: float = 30.0) -> None:
    """Fail fast, before any model is loaded: the server answers ``GET /models`` and serves ``model``."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
        served = [m.get("id") for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise OpenAIBackendError(f"GET {url} failed ({type(e).__name__}: {e})") from None
    if model not in served:
        raise ValueError(f"api_model: {base_url} serves {', '.join(map(str, served)) or 'nothing'}, not {model!r}")


class _Request:
    """One completions request: its prompts, ``n`` samples each, a seed, and the output rows
    its choices fill (choice k -> ``rows[k]``)."""

    def __init__(self, prompts: list[tuple[int, ...]], n: int, seed: int, rows: list[int]):
        self.prompts, self.n, self.seed, self.rows = prompts, n, seed, rows


def _plan(prompts: Sequence[Sequence[int]], seed: int, row_seeds: Sequence[int] | None) -> list[_Request]:
    """The requests that sample ``prompts``: one per row with its own seed when given
    ``row_seeds``, else identical prompts merged into ``n`` and prompts of equal ``n`` batched."""
    if row_seeds is not None:
        pairs = enumerate(zip(prompts, row_seeds, strict=True))
        return [_Request([tuple(p)], 1, int(s) % 2**63, [i]) for i, (p, s) in pairs]
    unique: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        unique.setdefault(tuple(p), []).append(i)
    by_n: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}
    for prompt, rows in unique.items():
        by_n.setdefault(len(rows), []).append((prompt, rows))
    requests = []
    for n, items in sorted(by_n.items()):
        rows = [r for _, ix in items for r in ix]  # choice i * n + j -> prompt i's sample j
        requests.append(_Request([p for p, _ in items], n, (seed * 1_000_003 + n) % 2**63, rows))
    return requests


def _completion(choice: dict[str, Any], url: str) -> Completion:
    """A choice with ``token_ids`` and aligned ``logprobs.token_logprobs`` -> Completion."""
    tokens = choice.get("token_ids")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs):
        raise OpenAIBackendError(
            f"{url}/completions: a choice without token_ids and aligned logprobs.token_logprobs "
            "(the server must support return_token_ids and logprobs, as vLLM >= 0.10.2 and mathrl serve do)"
        )
    reason: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion(tuple(int(t) for t in tokens), tuple(float(x) for x in logprobs), reason)


def _write_atomically(target: Path, write: Any) -> Path:
    """``write(tmp_dir)`` then rename to ``target``: the server never sees a half-written folder."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(target)
    return target
