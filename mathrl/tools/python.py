"""The ``python`` tool: a persistent, sandboxed Python session the model writes code for.

One :class:`mathrl.sandbox.Sandbox` session per episode, started at the episode's first
call and closed when it ends. A turn's calls across a whole batch of episodes run at once
(:func:`run_calls`), each episode's own calls in order in its own session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mathrl.sandbox import ERROR_KINDS as SANDBOX_ERRORS
from mathrl.sandbox import ExecResult, Sandbox, SandboxLimits
from mathrl.tools.formats import Tool
from mathrl.types import Message, ToolCall

PYTHON = Tool(
    "python",
    "Run Python code in a persistent session (variables and imports stay between calls) and return what it "
    "prints; the value of a last expression is shown too. numpy and sympy are installed.",
    {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
    },
)
ERROR_KINDS = ("parse", *SANDBOX_ERRORS)
"""What a tool error can be: a call that could not be parsed, or the sandbox's error kinds."""


@dataclass(frozen=True)
class CallRecord:
    """One executed call, for logs and evaluation rows."""

    code: str
    output: str
    error: str | None
    state_lost: bool
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "output": self.output, "error": self.error, "state_lost": self.state_lost,
                "duration_s": round(self.duration_s, 4)}  # fmt: skip


class PythonSession:
    """The tool's state in one episode: a sandbox session made on first use."""

    def __init__(self, limits: SandboxLimits, backend: str = "auto"):
        self.limits = limits
        self.backend = backend
        self.sandbox: Sandbox | None = None

    def call(self, call: ToolCall) -> CallRecord:
        code = call.args.get("code", "")
        if self.sandbox is None:
            self.sandbox = Sandbox(self.limits, backend=self.backend)
        start = time.monotonic()
        result: ExecResult = self.sandbox.run(code)
        return CallRecord(code, result.output, result.error, result.state_lost, time.monotonic() - start)

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None


MAX_CONCURRENT_SESSIONS = 64
"""Threads that drive sessions at once (each mostly waits on its session's pipes)."""


def run_calls(jobs: Sequence[tuple[PythonSession, Sequence[ToolCall]]]) -> list[list[CallRecord]]:
    """Each session's calls in order, up to ``MAX_CONCURRENT_SESSIONS`` sessions at once."""
    if not jobs:
        return []

    def run(job: tuple[PythonSession, Sequence[ToolCall]]) -> list[CallRecord]:
        session, calls = job
        return [session.call(c) for c in calls]

    with ThreadPoolExecutor(
        max_workers=min(len(jobs), MAX_CONCURRENT_SESSIONS), thread_name_prefix="mathrl-tool"
    ) as pool:
        return list(pool.map(run, jobs))


def result_message(call: ToolCall, record: CallRecord) -> Message:
    """The tool message the model reads: what the code printed (and any traceback, and the
    note when its session was restarted), or ``(no output)``."""
    text = record.output.rstrip("\n") or "(no output)"
    return Message("tool", text, tool_call_id=call.id, name=call.name)


def parse_error_message(error: str) -> Message:
    return Message("tool", f"Error: the tool call could not be read: {error}", name=PYTHON.name)


def example_call(code: str) -> ToolCall:
    return ToolCall(PYTHON.name, json.dumps({"code": code}), "call_example")
