"""A :class:`~mathrl.rollout.backend.ChatBackend` over any OpenAI-compatible HTTP endpoint.

``mathrl serve``, vLLM, SGLang and OpenAI itself all speak ``POST {base_url}/chat/completions``;
with this backend ``mathrl eval`` and ``mathrl distill`` can use any of them instead of a model
loaded in-process. ``base_url`` ends in ``/v1``, as for the ``openai`` client.

- One request per conversation, asking for its ``n`` samples at once; up to ``concurrency``
  requests are in flight together (a server such as ``mathrl serve`` or vLLM batches them).
- Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter,
  honouring a ``Retry-After`` header; any other 4xx is the caller's mistake and raises at once
  with the status and the server's message. A request still failing after ``max_retries``
  retries raises with the URL and the last error.
- ``seed`` is sent as ``seed + i`` for conversation ``i``: repeated runs send the same seeds and a
  server that honours them (mathrl serve run sequentially, vLLM) reproduces its samples.
- Token counts: the OpenAI API only reports ``usage.completion_tokens`` for the whole response, so
  each :class:`Sample` gets its choice's own count when the server gives one (``mathrl serve`` adds
  ``completion_tokens`` to every choice), else the total split evenly over the choices (exact for
  ``n=1``, an average for ``n>1``).
- ``finish_reason``: "length" stays "length"; anything else ("stop", "tool_calls",
  "content_filter", none) becomes "stop".
- Tool use (:meth:`OpenAIBackend.run_episodes`): every live episode sends its conversation
  with the env's ``tools``; the server parses the calls and returns them as ``tool_calls``
  (mathrl serve, vLLM with a tool parser, OpenAI); the envs of a turn are stepped together,
  their messages appended, and the next turn sent. Episode i's turn t is sent with the seed
  of :func:`mathrl.rollout.runner.turn_seed` (``seeds[i]``, t).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import httpx

from mathrl.envs.base import Env
from mathrl.rollout.backend import Sample, Turn
from mathrl.rollout.runner import play, turn_seed
from mathrl.tools.formats import Tool, check_call
from mathrl.types import Action, FinishReason, Message, StepResult

__all__ = ["OpenAIBackend", "OpenAIBackendError"]

T = TypeVar("T")
_MAX_DELAY_S = 60.0


class OpenAIBackendError(RuntimeError):
    """A request that failed for good: a status that is not retried, or retries used up.

    ``status`` is the last HTTP status (None when the last error was a connection error or a timeout).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server (see the module docstring for the behaviour)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        backoff_s: float = 1.0,
        max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
    ):
        """``api_key`` defaults to ``$OPENAI_API_KEY`` (no Authorization header when neither is set).
        ``max_tokens_param``: OpenAI's reasoning models only accept ``max_completion_tokens``; older
        servers only know ``max_tokens``, which is why it is the default."""
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_tokens_param = max_tokens_param

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        tools: Sequence[Sequence[Tool]] | None = None,
        stop: Sequence[str] = (),
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        """``n`` replies to each conversation (``result[i][j]``: conversation i, sample j);
        ``on_done(i)`` as conversation i's response arrives."""
        return _run_sync(
            self.agenerate(
                conversations, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                seeds=seeds, tools=tools, stop=stop, on_done=on_done,
            )
        )  # fmt: skip

    async def agenerate(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        tools: Sequence[Sequence[Tool]] | None = None,
        stop: Sequence[str] = (),
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        """:meth:`generate` for callers that already run an event loop. The first failure cancels the rest."""
        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=headers) as client:

            async def one(i: int, conversation: Sequence[Message]) -> list[Sample]:
                payload = self._payload(
                    conversation, n, max_tokens, temperature, top_p, seeds[i] if seeds else seed + i,
                    tools[i] if tools is not None else (), stop,
                )  # fmt: skip
                async with semaphore:
                    body = await self._post(client, payload)
                samples = _samples(body, n, self.url)
                if on_done is not None:
                    on_done(i)
                return samples

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(i, c)) for i, c in enumerate(conversations)]
            except ExceptionGroup as eg:  # raise the (first) real error, not the group
                raise eg.exceptions[0] from None
        return [task.result() for task in tasks]

    def run_episodes(
        self,
        envs: Sequence[Env],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seeds: Sequence[int],
        max_turns: int,
    ) -> list[list[Turn]]:
        """Multi-turn episodes over the chat API (see the module docstring), in :func:`play`'s loop."""
        driver = ChatDriver(self, envs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seeds=seeds)
        return [
            [Turn(a.text, a.num_tokens, "length" if a.truncated else "stop", r.reward, r.metrics, r.logs)
             for a, r in steps]
            for steps in play(envs, driver, max_turns)
        ]  # fmt: skip

    def _payload(
        self,
        conversation: Sequence[Message],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        tools: Sequence[Tool] = (),
        stop: Sequence[str] = (),
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m.as_dict() for m in conversation],
            "n": n,
            self.max_tokens_param: max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        if stop:
            payload["stop"] = list(stop)
        if tools:
            payload["tools"] = [t.as_dict() for t in tools]
            for message in payload["messages"]:  # the API carries arguments as a JSON string
                for call in message.get("tool_calls", []):
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
        return payload

    async def _post(
        self, client: httpx.AsyncClient, payload: dict[str, Any], url: str = "", json_reply: bool = True
    ) -> dict[str, Any]:
        """POST (to ``url``, default the chat endpoint) with retries on connection errors, timeouts,
        429 and 5xx; the response body as a dict (``{}`` when ``json_reply`` is False: vLLM answers
        its admin endpoints in plain text)."""
        url = url or self.url
        last_error, last_status, retry_after = "", None, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt, retry_after))
            try:
                response = await client.post(url, json=payload)
            except httpx.TransportError as e:  # connection refused/reset, timeouts, protocol errors
                last_error, last_status, retry_after = f"{type(e).__name__}: {e}", None, None
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                last_error, last_status = f"HTTP {status}: {_server_message(response)}", status
                retry_after = _retry_after(response)
                continue
            if status >= 400:
                raise OpenAIBackendError(
                    f"POST {url} -> HTTP {status}: {_server_message(response)}{self._hint(status)}", status
                )
            return _json_body(response, url) if json_reply else {}
        raise OpenAIBackendError(
            f"POST {url} failed after {self.max_retries + 1} attempts; last error: {last_error}", last_status
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff (``backoff_s``, 2x, 4x, ...) times a random factor in [0.5, 1.5), so
        clients that failed together do not retry together; a server's ``Retry-After`` is a floor."""
        delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
        return min(max(delay, retry_after or 0.0), _MAX_DELAY_S)

    def _hint(self, status: int) -> str:
        if status == 404 and not self.base_url.endswith("/v1"):
            return " (base_url usually ends in /v1, as for the openai client)"
        return ""


def _samples(body: dict[str, Any], n: int, url: str) -> list[Sample]:
    """The ``n`` samples of one chat.completion response, in choice-index order."""
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise OpenAIBackendError(f"POST {url}: asked for n={n} choices, got {got} (does the server support n?)")
    choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
    counts = _token_counts(choices, body.get("usage"))
    return [
        Sample(_text(c), k, _finish_reason(c.get("finish_reason")), _action(body, url, c).message.tool_calls)
        for c, k in zip(choices, counts, strict=True)
    ]


class ChatDriver:
    """:func:`play`'s replies from a chat API: every live episode's conversation is sent (with its
    env's tools) at once, up to ``concurrency`` requests in flight."""

    def __init__(
        self,
        backend: OpenAIBackend,
        envs: Sequence[Env],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seeds: Sequence[int],
    ):
        self.backend, self.envs, self.seeds = backend, envs, seeds
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.conversations = [env.initial_messages() for env in envs]

    def can_continue(self, e: int) -> bool:
        return True  # the server knows its context; an over-long request is its 400

    def sample(self, episodes: Sequence[int], turn: int) -> list[Action]:
        return _run_sync(self._turn(episodes, turn))

    async def _turn(self, episodes: Sequence[int], turn: int) -> list[Action]:
        b = self.backend
        semaphore = asyncio.Semaphore(b.concurrency)
        limits = httpx.Limits(max_connections=b.concurrency, max_keepalive_connections=b.concurrency)
        headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
        async with httpx.AsyncClient(timeout=b.timeout_s, limits=limits, headers=headers) as client:

            async def one(e: int) -> Action:
                payload = b._payload(self.conversations[e], 1, self.max_tokens, self.temperature, self.top_p,
                                     turn_seed(self.seeds[e], turn), self.envs[e].tools)  # fmt: skip
                async with semaphore:
                    body = await b._post(client, payload)
                return _action(body, b.url, tools=self.envs[e].tools)

            return list(await asyncio.gather(*(one(e) for e in episodes)))

    def extend(self, e: int, action: Action, result: StepResult) -> None:
        # a result without a call id (an unreadable call) goes back as a user turn: the API needs the id
        replies = [
            m if m.role != "tool" or m.tool_call_id else Message("user", m.content) for m in result.next_messages
        ]
        self.conversations[e] += [action.message, *replies]


def _action(
    body: dict[str, Any], url: str, choice: dict[str, Any] | None = None, tools: Sequence[Tool] | None = None
) -> Action:
    """A choice (default: the first) as an env action: content and the server's parsed tool calls,
    each checked against ``tools`` as the local parser checks them (None: only their shape)."""
    if choice is None:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise OpenAIBackendError(f"POST {url}: the response has no choices")
        choice = choices[0]
    calls, errors = [], []
    for k, raw in enumerate((choice.get("message") or {}).get("tool_calls") or []):
        function = raw.get("function") if isinstance(raw, dict) else {}
        function = function if isinstance(function, dict) else {}
        checked = check_call(
            function.get("name"), function.get("arguments") or "{}", tools, str(raw.get("id") or f"call_{k}")
        )
        if isinstance(checked, str):
            errors.append(checked)
        else:
            calls.append(checked)
    text = _text(choice)
    tokens = _token_counts([choice], body.get("usage"))[0]
    message = Message("assistant", text.strip(), tool_calls=tuple(calls))
    return Action(text, message, tuple(errors), tokens, _finish_reason(choice.get("finish_reason")) == "length")


def _text(choice: dict[str, Any]) -> str:
    message = choice.get("message") or {}
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _finish_reason(value: Any) -> FinishReason:
    return "length" if value == "length" else "stop"


def _token_counts(choices: Sequence[dict[str, Any]], usage: Any) -> list[int]:
    """Each choice's own ``completion_tokens`` when every choice has one, else the response total
    split as evenly as integers allow (the first choices take the remainder), 0 without usage."""
    own = [c.get("completion_tokens") for c in choices]
    if all(isinstance(k, int) for k in own):
        return [int(k) for k in own]  # type: ignore[arg-type]
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(total, int):
        return [0] * len(choices)
    share, extra = divmod(total, len(choices))
    return [share + (1 if i < extra else 0) for i in range(len(choices))]


def _server_message(response: httpx.Response) -> str:
    """The error message of an OpenAI-style error body, else the start of the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and isinstance(body.get("detail") or body.get("message"), str):
        return str(body.get("detail") or body.get("message"))
    return response.text[:500]


def _retry_after(response: httpx.Response) -> float | None:
    """A ``Retry-After`` header given in seconds (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _json_body(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise OpenAIBackendError(f"POST {url}: the response is not JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise OpenAIBackendError(f"POST {url}: expected a JSON object, got {type(body).__name__}")
    return body


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even when this thread already runs an
    event loop (a notebook): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
