"""``mathrl serve`` and ``OpenAIBackend`` against real servers on loopback.

The chat server runs the real embedded model in fp32: greedy replies must be identical served and
direct, batched and unbatched (with bf16 they can differ with batch composition, see mathrl.serve).
The retry tests use a tiny scripted ASGI server instead of the model. The vLLM-dialect tests
(``/v1/completions`` with token ids, adapters, ``reload_weights``) compare what the server returns
with the same TorchSampler, a locally merged adapter, or a local model given the same weights.
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
from mathrl.rollout.sampler import TorchSampler
from mathrl.serve import ServeConfig, _is_loopback, make_app
from mathrl.types import Completion, Message

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


class CountingSampler:
    """Wraps a TorchSampler and records each sample call's number of rows (the rest passes through)."""

    def __init__(self, inner: TorchSampler):
        self.inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sample(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[Completion]:
        self.calls.append(len(prompts))
        return self.inner.sample(prompts, **kwargs)


@dataclass
class CountingBackend:
    """Wraps a backend and records each generate call's (number of conversations, n, max_tokens);
    its sampler (what /v1/completions and adapters use) counts its calls too."""

    inner: LocalBackend

    def __post_init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.renderer = self.inner.renderer  # lets the server count prompt tokens
        self.tokenizer = self.inner.tokenizer
        self.sampler = CountingSampler(self.inner.sampler)  # type: ignore[arg-type]

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
    assert cfg.max_loras == 4 and cfg.allow_weight_updates is None  # None: on for loopback hosts only
    assert [_is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.0.0.2", "example.org")] == [
        True, True, True, False, False, False
    ]  # fmt: skip
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


# --- /v1/completions with token ids (vLLM's dialect) ---------------------------------------------


@pytest.fixture(scope="module")
def prompt_ids(local: LocalBackend) -> list[list[int]]:
    """Each question rendered with the chat template: the token ids a trainer sends."""
    return [local.renderer.initial_tokens(c, ()) for c in CONVERSATIONS]


def _complete(url: str, prompt: Any, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": prompt, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _text(local: LocalBackend, ids: Sequence[int]) -> str:
    return local.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (1.0, 0.9)])
def test_token_prompt_equals_the_sampler(
    server: tuple[str, CountingBackend],
    local: LocalBackend,
    prompt_ids: list[list[int]],
    temperature: float,
    top_p: float,
) -> None:
    """Prompt ids in, the sampler's own tokens and logprobs out: sample j of seed s is stream s + j."""
    url, _ = server
    ids = prompt_ids[1]
    body = _complete(
        url, ids, n=2, max_tokens=12, temperature=temperature, top_p=top_p, seed=7, logprobs=0, return_token_ids=True
    )
    direct = local.sampler.sample(
        [ids, ids], max_tokens=12, temperature=temperature, top_p=top_p, seed=0, row_seeds=[7, 8]
    )
    assert body["object"] == "text_completion" and body["model"] == MODEL_ID
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice, c in zip(body["choices"], direct, strict=True):
        assert choice["token_ids"] == list(c.tokens_T) and choice["prompt_token_ids"] == ids
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"] == list(c.logprobs_T)  # exactly the sampler's (same call)
        assert logprobs["tokens"] == [local.tokenizer.decode([t]) for t in c.tokens_T]
        assert logprobs["top_logprobs"] == [{t: lp} for t, lp in zip(logprobs["tokens"], c.logprobs_T, strict=True)]
        lengths = [len(t) for t in logprobs["tokens"]]
        assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
        assert choice["finish_reason"] == c.finish_reason and choice["stop_reason"] is None
        assert choice["text"] == _text(local, c.tokens_T)
    if temperature > 0:
        assert body["choices"][0]["token_ids"] != body["choices"][1]["token_ids"]  # two streams, not one
    assert body["usage"] == {
        "prompt_tokens": len(ids),  # counted once per prompt, as vLLM counts it
        "completion_tokens": sum(len(c.tokens_T) for c in direct),
        "total_tokens": len(ids) + sum(len(c.tokens_T) for c in direct),
    }


def test_rows_do_not_depend_on_batching(server: tuple[str, CountingBackend], prompt_ids: list[list[int]]) -> None:
    """Prompt i sample j of a request seeded s draws from s + i * n + j: one request with three prompts,
    and three concurrent requests (batched into fewer sampler calls) seeded 11, 13, 15, agree."""
    url, backend = server
    fields = {"n": 2, "max_tokens": 10, "temperature": 1.0, "logprobs": 0, "return_token_ids": True}
    together = _complete(url, prompt_ids, seed=11, **fields)["choices"]
    assert [c["prompt_token_ids"] for c in together] == [p for p in prompt_ids for _ in range(2)]

    async def fire() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            posts = [
                client.post("/v1/completions", json={"model": MODEL_ID, "prompt": p, "seed": 11 + 2 * i, **fields})
                for i, p in enumerate(prompt_ids)
            ]
            return [r.json() for r in await asyncio.gather(*posts)]

    before = len(backend.sampler.calls)
    apart = [c for body in asyncio.run(fire()) for c in body["choices"]]
    assert len(backend.sampler.calls) - before < len(prompt_ids)  # the concurrent requests shared a call
    assert [c["token_ids"] for c in apart] == [c["token_ids"] for c in together]
    for a, b in zip(apart, together, strict=True):  # other batch shapes: equal up to fp32 rounding
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)


def test_text_prompts_are_tokenized_without_a_template(
    server: tuple[str, CountingBackend], local: LocalBackend
) -> None:
    url, _ = server
    texts = ["What is 2 + 2? Answer:", "The sum of 3 and 4 is"]
    ids = [local.tokenizer(t).input_ids for t in texts]
    by_text = _complete(url, texts, max_tokens=4, temperature=0, return_token_ids=True)["choices"]
    by_ids = _complete(url, ids, max_tokens=4, temperature=0, return_token_ids=True)["choices"]
    assert [c["prompt_token_ids"] for c in by_text] == ids
    assert [c["token_ids"] for c in by_text] == [c["token_ids"] for c in by_ids]
    one = _complete(url, texts[0], max_tokens=4, temperature=0, return_token_ids=True)["choices"]
    assert [c["token_ids"] for c in one] == [by_ids[0]["token_ids"]]


def test_stop_strings_and_stop_tokens_end_rows_as_in_vllm(
    server: tuple[str, CountingBackend], local: LocalBackend, prompt_ids: list[list[int]]
) -> None:
    """token_ids run to the token that completes the stop string (or the stop/EOS token, kept);
    the text stops before the string, or after it with include_stop_str_in_output."""
    url, _ = server
    ids = prompt_ids[1]
    reference = list(local.sampler.sample([ids], max_tokens=16, temperature=0, seed=0)[0].tokens_T)
    full = _text(local, reference)
    stop = full.split()[3]  # a word from the middle of the greedy reply
    k = next(k for k in range(1, len(reference) + 1) if stop in _text(local, reference[:k]))
    for include in (False, True):
        (choice,) = _complete(
            url, ids, max_tokens=16, temperature=0, stop=[stop, "never-there"], include_stop_str_in_output=include,
            return_token_ids=True,
        )["choices"]  # fmt: skip
        assert choice["token_ids"] == reference[:k]
        cut = full.index(stop) + (len(stop) if include else 0)
        assert choice["text"] == full[:cut]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    stop_id = reference[3]
    for include in (False, True):
        (choice,) = _complete(
            url, ids, max_tokens=16, temperature=0, stop_token_ids=[stop_id], include_stop_str_in_output=include,
            return_token_ids=True, logprobs=0,
        )["choices"]  # fmt: skip
        first = reference.index(stop_id)
        assert choice["token_ids"] == reference[: first + 1]  # the stop token is kept in the ids
        assert choice["text"] == _text(local, reference[: first + 1 if include else first])
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_id)
        assert len(choice["logprobs"]["token_logprobs"]) == first + 1


def test_eos_is_kept_in_token_ids_and_left_out_of_text(
    server: tuple[str, CountingBackend], local: LocalBackend
) -> None:
    url, _ = server
    ids = local.renderer.initial_tokens([Message("user", "What is 1 + 1? Answer with the number only.")], ())
    eos = local.tokenizer.convert_tokens_to_ids("<|im_end|>")
    (plain,) = _complete(url, ids, max_tokens=16, temperature=0, return_token_ids=True)["choices"]
    assert plain["token_ids"][-1] == eos and plain["finish_reason"] == "stop" and plain["stop_reason"] is None
    assert plain["text"] == _text(local, plain["token_ids"]) and "<|im_end|>" not in plain["text"]
    (raw,) = _complete(
        url, ids, max_tokens=16, temperature=0, skip_special_tokens=False, include_stop_str_in_output=True
    )["choices"]
    assert raw["text"] == plain["text"] + "<|im_end|>"


def test_top_logprobs_are_the_sampled_distributions_best(
    server: tuple[str, CountingBackend], prompt_ids: list[list[int]]
) -> None:
    """Greedy picks the argmax, so the best alternative at each position is the sampled token itself,
    with the sampler's logprob: a position shifted by one in the extra forward pass would show."""
    url, _ = server
    (choice,) = _complete(url, prompt_ids[0], max_tokens=10, temperature=0, logprobs=3)["choices"]
    logprobs = choice["logprobs"]
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert len(top) == 3 and next(iter(top)) == token and top[token] == lp
        assert max(top.values()) == pytest.approx(lp, abs=1e-4)
        assert sorted(top.values(), reverse=True) == list(top.values())


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"model": "gpt-4"}, 404, "model"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [[1, 2], "text"]}, 400, "prompt"),
        ({"prompt": [1, -2]}, 400, "prompt"),
        ({"prompt": [10**6]}, 400, "prompt"),
        ({"prompt": [1.5]}, 400, "prompt"),
        ({"max_tokens": 65}, 400, "max_tokens"),
        ({"n": 17}, 400, "n"),
        ({"logprobs": 21}, 400, "logprobs"),
        ({"logprobs": -1}, 400, "logprobs"),
        ({"stop": [""]}, 400, "stop"),
        ({"temperature": -0.5}, 400, "temperature"),
        # implemented by vLLM, not here: refused, never silently ignored
        ({"stream": True}, 400, "stream"),
        ({"echo": True}, 400, "echo"),
        ({"suffix": "x"}, 400, "suffix"),
        ({"best_of": 2}, 400, "best_of"),
        ({"logit_bias": {"5": 1.0}}, 400, "logit_bias"),
        ({"presence_penalty": 0.1}, 400, "presence_penalty"),
        ({"frequency_penalty": 0.1}, 400, "frequency_penalty"),
        ({"repetition_penalty": 1.1}, 400, "repetition_penalty"),
        ({"top_k": 5}, 400, "top_k"),
        ({"min_p": 0.05}, 400, "min_p"),
        ({"min_tokens": 2}, 400, "min_tokens"),
        ({"ignore_eos": True}, 400, "ignore_eos"),
        ({"use_beam_search": True}, 400, "use_beam_search"),
        ({"prompt_logprobs": 1}, 400, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 4}, 400, "truncate_prompt_tokens"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"guided_regex": "a+"}, 400, "guided_regex"),
    ],
)
def test_completions_refuse_what_they_do_not_implement(
    server: tuple[str, CountingBackend], prompt_ids: list[list[int]], fields: dict[str, Any], status: int, param: str
) -> None:
    url, backend = server
    before = len(backend.sampler.calls)
    body = {"model": MODEL_ID, "prompt": prompt_ids[0], "max_tokens": 4, **fields}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    if status == 404:
        assert error["message"] == "The model `gpt-4` does not exist."  # vLLM's words
    assert len(backend.sampler.calls) == before


def test_the_openai_client_gets_token_ids(
    server: tuple[str, CountingBackend], local: LocalBackend, prompt_ids: list[list[int]]
) -> None:
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    reference = local.sampler.sample([prompt_ids[2]], max_tokens=6, temperature=0, seed=0)[0]
    result = client.completions.create(
        model=MODEL_ID, prompt=prompt_ids[2], max_tokens=6, temperature=0, logprobs=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    (choice,) = result.choices
    assert choice.model_extra is not None and choice.model_extra["token_ids"] == list(reference.tokens_T)
    assert choice.logprobs is not None and choice.logprobs.token_logprobs == list(reference.logprobs_T)
    assert choice.text == _text(local, reference.tokens_T) and choice.finish_reason == reference.finish_reason
    assert result.usage is not None and result.usage.completion_tokens == len(reference.tokens_T)


# --- weight updates: LoRA adapters and reload_weights --------------------------------------------

LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _save_adapter(model: torch.nn.Module, path: Any, seed: int) -> Any:
    """A LoRA r=4 adapter on a copy of ``model`` with lora_B drawn from ``seed`` (large enough to
    change greedy replies), saved with save_pretrained."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(path)
    return path


def _merged_sampler(model: torch.nn.Module, adapter: Any, tokenizer: Any) -> TorchSampler:
    """What the server should sample from: the adapter merged locally into a copy of ``model``."""
    import copy

    from peft import PeftModel

    from mathrl.models import eos_token_ids

    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload()
    return TorchSampler(merged, eos_token_ids(tokenizer), int(tokenizer.pad_token_id), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def adapter_dir(local: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _save_adapter(local.sampler.model, tmp_path_factory.mktemp("adapter") / "a", seed=0)


def _greedy(sampler: TorchSampler, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    return [list(c.tokens_T) for c in sampler.sample(prompts, max_tokens=max_tokens, temperature=0, seed=0)]


def _served_greedy(url: str, prompts: list[list[int]], model: str = MODEL_ID, max_tokens: int = 12) -> list[list[int]]:
    body = _complete(url, prompts, model=model, max_tokens=max_tokens, temperature=0, return_token_ids=True)
    assert body["model"] == model
    return [c["token_ids"] for c in body["choices"]]


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def test_a_lora_adapter_is_loaded_sampled_and_unloaded(
    server: tuple[str, CountingBackend], local: LocalBackend, prompt_ids: list[list[int]], adapter_dir: Any
) -> None:
    url, _ = server
    base = _greedy(local.sampler, prompt_ids)
    merged = _greedy(_merged_sampler(local.sampler.model, adapter_dir, local.tokenizer), prompt_ids)
    assert merged != base  # the adapter changes the replies: the comparison below means something

    async def load_while_sampling() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {
                "model": MODEL_ID,
                "prompt": prompt_ids,
                "max_tokens": 12,
                "temperature": 0,
                "return_token_ids": True,
            }
            load = {"lora_name": "a", "lora_path": str(adapter_dir)}
            sampled, loaded = await asyncio.gather(
                client.post("/v1/completions", json=body), client.post("/v1/load_lora_adapter", json=load)
            )
            return sampled, loaded

    try:
        sampled, loaded = asyncio.run(load_while_sampling())
        assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'a' added successfully.")
        assert [c["token_ids"] for c in sampled.json()["choices"]] == base  # not disturbed by the load
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["a"]["parent"] == MODEL_ID and cards["a"]["root"] == str(adapter_dir)
        assert cards[MODEL_ID]["parent"] is None
        assert _served_greedy(url, prompt_ids, model="a") == merged
        assert _served_greedy(url, prompt_ids) == base  # the base model is untouched
        chat_body = {**_request(QUESTIONS[0], max_tokens=12, temperature=0), "model": "a"}
        chat = httpx.post(f"{url}/v1/chat/completions", json=chat_body, timeout=120)
        assert chat.json()["choices"][0]["message"]["content"] == _text(local, merged[0])
        again = _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapter_dir)})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        inplace = {"lora_name": "a", "lora_path": str(adapter_dir), "load_inplace": True}
        assert _post(url, "/v1/load_lora_adapter", inplace).status_code == 200
    finally:
        unloaded = _post(url, "/v1/unload_lora_adapter", {"lora_name": "a"})
    assert (unloaded.status_code, unloaded.text) == (200, "Success: LoRA adapter 'a' removed successfully.")
    gone = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": prompt_ids[0]}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "The model `a` does not exist."
    missing = _post(url, "/v1/unload_lora_adapter", {"lora_name": "a"})
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "The lora adapter 'a' cannot be found."
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL_ID]


@pytest.fixture(scope="module")
def bad_adapters(
    adapter_dir: Any, tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Adapter directories that must not load, by what is wrong with them."""
    root = tmp_path_factory.mktemp("bad")
    config = (adapter_dir / "adapter_config.json").read_text()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(weights)
    (root / "no_weights").mkdir()
    (root / "no_weights" / "adapter_config.json").write_text(config)
    (root / "truncated").mkdir()
    (root / "truncated" / "adapter_config.json").write_text(config)
    (root / "truncated" / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "bad_json").mkdir()
    (root / "bad_json" / "adapter_config.json").write_text(config[: len(config) // 2])
    (root / "bad_json" / "adapter_model.safetensors").write_bytes(weights)
    (root / "a_file").write_text("not a directory")
    return {
        "missing": (root / "missing", "does not exist"),
        "a_file": (root / "a_file", "is not a directory"),
        "no_config": (root / "no_config", "no adapter_config.json"),
        "no_weights": (root / "no_weights", "no adapter_model.safetensors"),
        "truncated": (root / "truncated", "unreadable adapter_model.safetensors"),
        "bad_json": (root / "bad_json", "unreadable adapter_config.json"),
        "other_architecture": (_save_adapter(tiny_model, root / "tiny", seed=1), "does not fit the served model"),
    }


@pytest.mark.parametrize(
    "kind", ["missing", "a_file", "no_config", "no_weights", "truncated", "bad_json", "other_architecture"]
)
def test_a_bad_adapter_is_a_400_and_the_server_goes_on(
    server: tuple[str, CountingBackend], bad_adapters: dict[str, Any], prompt_ids: list[list[int]], kind: str
) -> None:
    url, _ = server
    path, what = bad_adapters[kind]
    response = _post(url, "/v1/load_lora_adapter", {"lora_name": kind, "lora_path": str(path)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "lora_path" and str(path) in error["message"] and what in error["message"]
    assert "\n" not in error["message"]
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL_ID]
    assert len(_served_greedy(url, prompt_ids[:1], max_tokens=2)[0]) == 2  # still serving


def test_max_loras_caps_the_adapters(local: LocalBackend, adapter_dir: Any) -> None:
    with serving(make_app(local, MODEL_ID, max_loras=1)) as url:
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapter_dir)}).status_code == 200
        second = _post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapter_dir)})
        assert second.status_code == 400 and second.json()["error"]["param"] == "max_loras"
        assert "unload one" in second.json()["error"]["message"]
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 200
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapter_dir)}).status_code == 200


def test_reload_weights_replaces_the_base_and_remerges_adapters(
    local: LocalBackend, prompt_ids: list[list[int]], adapter_dir: Any, tmp_path: Any
) -> None:
    """Full weights pushed as a trainer pushes them (save_pretrained, bf16) replace the served ones in
    place: replies then equal a local model given the same weights, and a loaded adapter is merged
    again onto them; a bad push changes nothing."""
    import copy

    prompt_ids = prompt_ids[1:]

    model = copy.deepcopy(local.sampler.model)  # this server's own weights: the shared fixture stays as it is
    generator = torch.Generator().manual_seed(3)
    state = {
        k: (v + 0.02 * torch.randn(v.shape, generator=generator) if ".mlp." in k else v).to(torch.bfloat16)
        for k, v in model.state_dict().items()
    }
    model.save_pretrained(tmp_path / "new", state_dict=state)
    updated = copy.deepcopy(local.sampler.model)
    updated.load_state_dict({k: v.float() for k, v in state.items()})
    from mathrl.models import eos_token_ids

    tokenizer = local.tokenizer
    expected = _greedy(TorchSampler(updated, eos_token_ids(tokenizer), int(tokenizer.pad_token_id)), prompt_ids)
    expected_adapter = _greedy(_merged_sampler(updated, adapter_dir, tokenizer), prompt_ids)
    before = _greedy(local.sampler, prompt_ids)
    assert expected != before
    from safetensors.torch import save_file

    (tmp_path / "wrong_shape").mkdir()
    save_file({"model.norm.weight": torch.zeros(3)}, tmp_path / "wrong_shape" / "model.safetensors")
    (tmp_path / "partial").mkdir()
    save_file({"model.norm.weight": state["model.norm.weight"]}, tmp_path / "partial" / "model.safetensors")

    with serving(make_app(LocalBackend(model, tokenizer), MODEL_ID)) as url:
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapter_dir)}).status_code == 200
        assert _served_greedy(url, prompt_ids) == before
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "new")}}
        response = _post(url, "/collective_rpc", rpc)
        assert (response.status_code, response.json()) == (200, {"results": [None]})
        assert _post(url, "/reset_prefix_cache", {}).json() == {"success": True}
        assert _served_greedy(url, prompt_ids) == expected
        assert _served_greedy(url, prompt_ids, model="a") == expected_adapter  # not the adapter on the old base
        for bad, param, words in [
            ({"weights_path": str(tmp_path / "wrong_shape")}, "kwargs.weights_path", "'model.norm.weight' in"),
            ({"weights_path": str(tmp_path / "partial")}, "kwargs.weights_path", "lacks"),
            ({"weights_path": str(tmp_path / "nowhere")}, "kwargs.weights_path", "not a directory"),
            ({}, "kwargs.weights_path", "weights_path"),
            ({"weights_path": str(tmp_path / "new"), "strict": True}, "kwargs.strict", "kwargs.strict"),
        ]:
            response = _post(url, "/collective_rpc", {"method": "reload_weights", "kwargs": bad})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param and words in response.json()["error"]["message"]
        response = _post(url, "/collective_rpc", {"method": "sleep", "kwargs": {}})
        assert response.status_code == 400 and response.json()["error"]["param"] == "method"
        assert _served_greedy(url, prompt_ids) == expected  # the refused pushes changed nothing


def test_weight_updates_can_be_off() -> None:
    """Beyond loopback the endpoints that change weights answer 403 unless allowed; the rest work."""
    with serving(make_app(FailingBackend(), MODEL_ID, weight_updates=False)) as url:
        for path, body in [
            ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}),
            ("/v1/unload_lora_adapter", {"lora_name": "a"}),
            ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "/tmp"}}),
        ]:
            response = _post(url, path, body)
            assert response.status_code == 403 and "allow_weight_updates" in response.json()["error"]["message"]
        assert _post(url, "/reset_prefix_cache", {}).json() == {"success": True}
        # a backend without a token sampler: completions are refused, not failed
        assert _post(url, "/v1/completions", {"model": MODEL_ID, "prompt": [1, 2]}).status_code == 501
