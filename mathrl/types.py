"""The domain nouns: messages, sampled completions, trajectories and groups.

Frozen dataclasses with no behaviour beyond small derived properties, so every
other module can share them without importing torch or transformers.
Shape suffixes follow tinker-cookbook: ``_G`` per group member, ``_T`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


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

    ``next_messages`` are appended to the conversation when the episode goes on
    (e.g. a tool's output); a single-turn env returns ``episode_done=True``.
    """

    reward: float
    episode_done: bool
    next_messages: tuple[Message, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    """One turn: the rendered prompt tokens, the sampled action and its outcome."""

    ob_tokens_T: tuple[int, ...]
    ac: Completion
    ac_text: str
    reward: float
    episode_done: bool
    metrics: dict[str, float] = field(default_factory=dict)


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
