"""The domain nouns: messages, sampled completions, trajectories and groups.

Frozen dataclasses with no behaviour beyond small derived properties, so every
other module can share them without importing torch or transformers.
Shape suffixes follow tinker-cookbook: ``_G`` per group member, ``_T`` per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made: the tool's name and its arguments as a JSON object text
    (a string keeps the dataclass frozen and hashable, and is what OpenAI's API carries)."""

    name: str
    arguments: str
    id: str = ""

    @property
    def args(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        return value if isinstance(value, dict) else {}

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's shape; chat templates read ``function.arguments`` as a mapping."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.args}}


@dataclass(frozen=True)
class Message:
    """One chat message. An assistant message may carry tool calls; a tool message answers
    the call ``tool_call_id`` of tool ``name``."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The dict chat templates and OpenAI clients take (tool fields only when set)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Action:
    """One sampled reply as an env sees it: the decoded text, the message parsed from it
    (content and tool calls, by the renderer's tool-call format), the calls that could not
    be parsed (each one error text), its length and whether ``max_tokens`` cut it."""

    text: str
    message: Message
    parse_errors: tuple[str, ...] = ()
    num_tokens: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class Problem:
    """A math problem with its reference answer (LaTeX, without ``\\boxed``), as every
    dataset is normalized to it. ``source`` names the dataset it came from."""

    id: str
    problem: str
    answer: str
    solution: str | None = None
    level: int | None = None
    subject: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Completion:
    """What the sampler returns for one prompt: new tokens and their logprobs."""

    tokens_T: tuple[int, ...]
    logprobs_T: tuple[float, ...]
    finish_reason: FinishReason


@dataclass(frozen=True)
class StepResult:
    """The environment's answer to one action.

    ``next_messages`` follow the action when the episode goes on (e.g. a tool's output);
    a single-turn env returns ``episode_done=True``. ``logs`` is a record for people (the
    tool calls with their code, output, error kind and duration), kept in rollouts and
    evaluation rows, never used by training.
    """

    reward: float
    episode_done: bool
    next_messages: tuple[Message, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    """One turn: the prompt tokens the sampler continued (the first observation, then every
    earlier turn's sampled tokens and bridged observation, verbatim), the sampled action and
    its outcome."""

    ob_tokens_T: tuple[int, ...]
    ac: Completion
    ac_text: str
    reward: float
    episode_done: bool
    metrics: dict[str, float] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trajectory:
    """All turns of one episode."""

    transitions: tuple[Transition, ...]

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.transitions)

    @property
    def num_ac_tokens(self) -> int:
        return sum(len(t.ac.tokens_T) for t in self.transitions)


@dataclass(frozen=True)
class TrajectoryGroup:
    """The ``group_size`` episodes sampled for one problem; advantages are computed within it."""

    trajectories_G: tuple[Trajectory, ...]
    tag: str = "all"

    @property
    def rewards_G(self) -> list[float]:
        return [t.total_reward for t in self.trajectories_G]
