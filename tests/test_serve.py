"""``mathrl serve`` and ``OpenAIBackend`` against real servers on loopback.

The chat server runs the real embedded model in fp32: greedy replies must be identical served and
direct, batched and unbatched (with bf16 they can differ with batch composition, see mathrl.serve).
The retry tests use a tiny scripted ASGI server instead of the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import pytest
import torch
import uvicorn

from mathrl.config import config_help, parse_config
from mathrl.models import EMBEDDED_MODEL
from mathrl.rollout.backend import LocalBackend, Sample
from mathrl.rollout.openai_backend import OpenAIBackend, OpenAIBackendError
from mathrl.serve import ServeConfig, make_app
from mathrl.types import Message

MODEL_ID = "mathrl-test"
MAX_TOKENS = 24
QUESTIONS = ["What is 12 + 35?", "Compute 7 * 8.", "What is 100 - 37?"]
CONVERSATIONS = [[Message("user", q)] for q in QUESTIONS]


@contextmanager
def serving(app: Any, lifespan: Literal["on", "off"] = "on") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class CountingBackend:
    """Wraps a backend and records each generate call's (number of conversations, n, max_tokens)."""

    inner: LocalBackend

    def __post_init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.renderer = self.inner.renderer  # lets the server count prompt tokens

    def generate(self, conversations: Sequence[Sequence[Message]], **kwargs: Any) -> list[list[Sample]]:
        self.calls.append((len(conversations), kwargs["n"], kwargs["max_tokens"]))
        return self.inner.generate(conversations, **kwargs)


@pytest.fixture(scope="module")
def local() -> Iterator[LocalBackend]:
    """The embedded model in fp32, run on one torch thread: on this 2-core machine, when other
    processes use the cores too, 2 threads were 3-4x slower than 1 (the worker threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield LocalBackend.load(EMBEDDED_MODEL, torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(local: LocalBackend) -> list[Sample]:
    """Each question's greedy reply, generated alone (unbatched)."""
    return [local.generate([c], n=1, max_tokens=MAX_TOKENS, temperature=0)[0][0] for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def direct(local: LocalBackend) -> list[list[Sample]]:
    """Greedy replies to all questions in one direct (batched) call, two each."""
    return local.generate(CONVERSATIONS, n=2, max_tokens=MAX_TOKENS, temperature=0, seed=3)


@pytest.fixture(scope="module")
def server(local: LocalBackend) -> Iterator[tuple[str, CountingBackend]]:
    backend = CountingBackend(local)
    app = make_app(backend, MODEL_ID, max_batch=16, max_tokens_limit=64)
    with serving(app) as url:
        yield url, backend


def test_config_defaults_and_help() -> None:
    cfg = parse_config(ServeConfig, [])
    assert cfg.model == EMBEDDED_MODEL and cfg.port == 8000 and cfg.host == "127.0.0.1"
    cfg = parse_config(ServeConfig, ["port=0", "dtype=bf16", "served_model_name=m"])
    assert (cfg.port, cfg.dtype, cfg.served_model_name) == (0, "bf16", "m")
    assert "max_tokens_limit" in config_help(ServeConfig, "mathrl serve")


def test_models_lists_served_name(server: tuple[str, CountingBackend], caplog: pytest.LogCaptureFixture) -> None:
    url, _ = server
    caplog.set_level(logging.INFO, logger="mathrl.serve")
    body = httpx.get(f"{url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    lines = [r.getMessage() for r in caplog.records if r.name == "mathrl.serve"]
    assert any(line.startswith("GET /v1/models 200") and line.endswith("s") for line in lines)


@pytest.mark.parametrize("n", [1, 2])
def test_served_greedy_equals_local(
    server: tuple[str, CountingBackend], direct: list[list[Sample]], reference: list[Sample], n: int
) -> None:
    url, _ = server
    client = OpenAIBackend(f"{url}/v1", MODEL_ID, api_key="unused")
    served = client.generate(CONVERSATIONS, n=n, max_tokens=MAX_TOKENS, temperature=0, seed=3)
    assert served == [row[:n] for row in direct]  # texts, per-choice token counts and finish reasons
    assert [row[0] for row in served] == reference
    assert any(s.finish_reason == "length" and s.num_tokens == MAX_TOKENS for row in served for s in row)


def test_concurrent_requests_are_batched(server: tuple[str, CountingBackend], reference: list[Sample]) -> None:
    url, backend = server
    requests = [(q, n) for n in (1, 2) for q in range(len(QUESTIONS))]  # mixed n share calls too

    async def fire() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            posts = [
                client.post(
                    "/v1/chat/completions", json=_request(QUESTIONS[q], n=n, max_tokens=MAX_TOKENS, temperature=0)
                )
                for q, n in requests
            ]
            return [r.json() for r in await asyncio.gather(*posts)]

    before = len(backend.calls)
    bodies = asyncio.run(fire())
    calls = backend.calls[before:]
    assert len(calls) < len(requests), calls
    assert max(conversations for conversations, _, _ in calls) > 1
    for (q, n), body in zip(requests, bodies, strict=True):
        assert [c["message"]["content"] for c in body["choices"]] == [reference[q].text] * n
        assert [c["finish_reason"] for c in body["choices"]] == [reference[q].finish_reason] * n
        assert body["object"] == "chat.completion" and body["model"] == MODEL_ID
        usage = body["usage"]
        assert usage["completion_tokens"] == n * reference[q].num_tokens
        assert usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_only_equal_settings_share_a_call(server: tuple[str, CountingBackend]) -> None:
    url, backend = server
    bodies = [_request(q, max_tokens=k, temperature=0) for k in (1, 2) for q in QUESTIONS]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    before = len(backend.calls)
    assert all(r.status_code == 200 for r in asyncio.run(fire()))
    calls = backend.calls[before:]
    assert sum(k for k, _, _ in calls) == len(bodies) and len(calls) < len(bodies)
    assert {max_tokens for _, _, max_tokens in calls} == {1, 2}  # never a call mixing the two


def test_sampled_request_served_alone_is_reproducible(server: tuple[str, CountingBackend], local: LocalBackend) -> None:
    """At temperature > 0 a request draws from its own streams: sample j of seed s uses s + j."""
    url, _ = server
    body = _request(QUESTIONS[1], n=2, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    choices = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"]
    direct = local.generate([CONVERSATIONS[1]], n=2, max_tokens=8, temperature=1.0, top_p=0.9, seeds=[7])[0]
    assert [c["message"]["content"] for c in choices] == [s.text for s in direct]


class FailingBackend:
    def generate(self, conversations: Sequence[Sequence[Message]], **kwargs: Any) -> list[list[Sample]]:
        raise RuntimeError("boom")


def test_generation_failure_is_a_500_and_the_server_goes_on() -> None:
    with serving(make_app(FailingBackend(), MODEL_ID)) as url:
        for _ in range(2):
            response = httpx.post(f"{url}/v1/chat/completions", json=_request(), timeout=30)
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error" and "boom" in error["message"]


def _request(question: str = "1+1?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": question}], **fields}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL_ID}, 400, "messages"),
        (_request(stream=True), 400, "stream"),
        (_request(n=0), 400, "n"),
        (_request(temperature=-1), 400, "temperature"),
        (_request(max_tokens=65), 400, "max_tokens"),
        ({"model": MODEL_ID, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        (
            {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0].type",
        ),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**_request(), "model": "gpt-4"}, 404, "model"),
        # fields this server does not implement: refused, never silently ignored
        (_request(logprobs=True), 400, "logprobs"),
        (_request(top_logprobs=2), 400, "top_logprobs"),
        (_request(presence_penalty=0.5), 400, "presence_penalty"),
        (_request(frequency_penalty=-1), 400, "frequency_penalty"),
        (_request(logit_bias={"42": 5}), 400, "logit_bias"),
        (_request(response_format={"type": "json_object"}), 400, "response_format"),
        (_request(stream_options={"include_usage": True}), 400, "stream_options"),
        (_request(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), 400, "tool_choice"),
        (_request(tools=[{"type": "retrieval"}]), 400, "tools[0]"),
        (_request(guided_json={"type": "object"}), 400, "guided_json"),
        (_request(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (
            {
                "model": MODEL_ID,
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
                        ],
                    }
                ],
            },
            400,
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_requests_name_the_param(
    server: tuple[str, CountingBackend], body: dict[str, Any], status: int, param: str
) -> None:
    url, backend = server
    before = len(backend.calls)
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split("[")[0] in error["message"]
    assert len(backend.calls) == before


def test_malformed_json_is_a_400(server: tuple[str, CountingBackend]) -> None:
    url, _ = server
    response = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_text_parts_are_joined(server: tuple[str, CountingBackend]) -> None:
    url, _ = server
    parts = [{"type": "text", "text": "What is 12 "}, {"type": "text", "text": "+ 35?"}]
    bodies = [_request(QUESTIONS[0], max_tokens=2, temperature=0), _request(max_tokens=2, temperature=0)]
    bodies[1]["messages"][0]["content"] = parts

    async def fire() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            posts = [client.post("/v1/chat/completions", json=body) for body in bodies]
            return [r.json() for r in await asyncio.gather(*posts)]

    plain, joined = asyncio.run(fire())
    assert joined["usage"] == plain["usage"]
    assert joined["choices"][0]["message"] == plain["choices"][0]["message"]


class ScriptedServer:
    """A minimal ASGI app: answers the k-th POST with the k-th scripted status (the last one repeats)
    and records every request body. A 200 is a chat.completion with two choices and only a total count."""

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.payloads: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.payloads.append(json.loads(body))
        status = self.statuses[min(len(self.payloads), len(self.statuses)) - 1]
        reply = self._completion() if status == 200 else {"error": {"message": f"scripted failure {status}"}}
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})

    @staticmethod
    def _completion() -> dict[str, Any]:
        choices = [
            {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "content_filter"},
            {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "length"},
        ]
        return {"object": "chat.completion", "choices": choices, "usage": {"completion_tokens": 7}}


def _client(url: str, **kwargs: Any) -> OpenAIBackend:
    return OpenAIBackend(f"{url}/v1", "any-model", backoff_s=0.01, **kwargs)


@pytest.mark.parametrize("statuses", [[503, 503, 200], [429, 500, 200]])
def test_retries_then_succeeds(statuses: list[int]) -> None:
    scripted = ScriptedServer(statuses)
    with serving(scripted, lifespan="off") as url:
        result = _client(url).generate([CONVERSATIONS[0]], n=2, max_tokens=5, temperature=0.5, seed=4)
    assert len(scripted.payloads) == 3
    # choices in index order; no per-choice counts here, so the total 7 is split 4 + 3; only "length" stays
    assert result == [[Sample("a", 4, "length"), Sample("b", 3, "stop")]]


def test_request_fields_and_seeds() -> None:
    scripted = ScriptedServer([200])
    with serving(scripted, lifespan="off") as url:
        _client(url, concurrency=1).generate(CONVERSATIONS[:2], n=2, max_tokens=5, temperature=0.5, top_p=0.9, seed=10)
    assert [p["seed"] for p in scripted.payloads] == [10, 11]  # in order: concurrency=1
    first = scripted.payloads[0]
    assert first["model"] == "any-model" and first["n"] == 2 and first["max_tokens"] == 5
    assert (first["temperature"], first["top_p"]) == (0.5, 0.9)
    assert first["messages"] == [{"role": "user", "content": QUESTIONS[0]}]


def test_client_error_is_not_retried() -> None:
    scripted = ScriptedServer([400, 200])
    with serving(scripted, lifespan="off") as url, pytest.raises(OpenAIBackendError) as info:
        _client(url).generate([CONVERSATIONS[0]], n=2, max_tokens=5, temperature=0)
    assert len(scripted.payloads) == 1
    assert info.value.status == 400
    assert "400" in str(info.value) and "scripted failure 400" in str(info.value)


def test_gives_up_after_max_retries() -> None:
    scripted = ScriptedServer([503])
    with serving(scripted, lifespan="off") as url, pytest.raises(OpenAIBackendError) as info:
        _client(url, max_retries=2).generate([CONVERSATIONS[0]], n=2, max_tokens=5, temperature=0)
    assert len(scripted.payloads) == 3
    assert f"{url}/v1/chat/completions" in str(info.value) and "503" in str(info.value)


def test_connection_errors_are_retried_then_reported() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(OpenAIBackendError, match=r"after 2 attempts.*ConnectError") as info:
        _client(url, max_retries=1).generate([CONVERSATIONS[0]], n=1, max_tokens=5, temperature=0)
    assert url in str(info.value) and info.value.status is None


def test_stop_strings_end_the_reply_and_are_left_out(
    server: tuple[str, CountingBackend], reference: list[Sample]
) -> None:
    url, _ = server
    text = reference[0].text
    stop = text.split()[1]  # a word from the middle of the greedy reply
    body = _request(QUESTIONS[0], max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    assert reply["message"]["content"] == text[: text.index(stop)]
    assert reply["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def tool_server(local: LocalBackend) -> Iterator[str]:
    """The same model, serving tool calls in the code_block format (the one it writes)."""
    backend = LocalBackend(local.sampler.model, local.tokenizer, tool_parser="code_block")
    with serving(make_app(backend, MODEL_ID, max_batch=16, max_tokens_limit=64)) as url:
        yield url


def test_a_tool_loop_driven_by_the_openai_client(tool_server: str) -> None:
    from openai import OpenAI

    from mathrl.sandbox import Sandbox
    from mathrl.tools.python import PYTHON

    client = OpenAI(base_url=f"{tool_server}/v1", api_key="unused", timeout=120)
    example = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "python", "arguments": '{"code": "print(12 * 34)"}'},
    }
    messages: list[Any] = [
        {"role": "system", "content": "Use the python tool for calculations, then give the answer in \\boxed{}."},
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "content": None, "tool_calls": [example]},
        {"role": "tool", "tool_call_id": "call_0", "content": "408"},
        {"role": "assistant", "content": "12 * 34 = \\boxed{408}"},
        {"role": "user", "content": "What is 402 * 116?"},
    ]
    first = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[PYTHON.as_dict()], temperature=0, max_tokens=48, seed=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "python"
    code = json.loads(call.function.arguments)["code"]
    assert "402" in code and "116" in code
    with Sandbox(backend="rlimit") as sandbox:
        output = sandbox.run(code).output
    assert output.strip() == "46632"
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": output},
    ]
    second = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=[PYTHON.as_dict()], temperature=0, max_tokens=48, seed=0
    )
    final = second.choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "46632" in final.message.content
    without = client.chat.completions.create(
        model=MODEL_ID, messages=[messages[5]], tools=[PYTHON.as_dict()], tool_choice="none",
        temperature=0, max_tokens=48,
    )  # fmt: skip
    assert not without.choices[0].message.tool_calls  # tool_choice="none": no tools offered, none parsed


def test_eval_over_an_endpoint_runs_the_tool_loop(tool_server: str) -> None:
    from mathrl.envs.math_python import MathPythonEnv, ToolOptions, tool_messages

    options = ToolOptions(sandbox="rlimit")
    envs = [MathPythonEnv(tool_messages(q, options), ref, "boxed", options) for q, ref in
            [("What is 402 * 116?", "46632"), ("What is 856 * 115?", "98440")]]  # fmt: skip
    client = OpenAIBackend(f"{tool_server}/v1", MODEL_ID, api_key="unused")
    episodes = client.run_episodes(envs, max_tokens=48, temperature=0, seeds=[1, 2], max_turns=4)
    for turns in episodes:
        assert len(turns) == 2 and turns[0].metrics["num_tool_calls"] == 1  # a call, then the final reply
        assert turns[0].logs["tool_calls"][0]["error"] is None
        assert turns[-1].logs["answer"] is not None
