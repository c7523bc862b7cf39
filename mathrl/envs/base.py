"""The Env protocol, group builders and RL datasets.

An Env is one episode: it gives the opening messages, then answers each action with a
StepResult (reward, done, and the messages that follow when the episode goes on, such
as a tool's output). Single-turn math is the case ``max_turns == 1``; nothing here
assumes it. A GroupBuilder makes the ``group_size`` envs of one problem; an RLDataset
hands out the builders of batch ``i`` as a pure function of ``i`` (so resuming at step
``i`` needs no replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mathrl.types import Message, StepResult


class Env(Protocol):
    def initial_messages(self) -> list[Message]: ...

    def step(self, action: str) -> StepResult: ...


class GroupBuilder(Protocol):
    """Makes the envs for one problem; the group's rewards are compared with each other."""

    @property
    def tag(self) -> str: ...

    def make_envs(self, group_size: int) -> Sequence[Env]: ...


class RLDataset(Protocol):
    def get_batch(self, index: int) -> Sequence[GroupBuilder]: ...

    def test_builders(self) -> Sequence[GroupBuilder]: ...


@dataclass(frozen=True)
class SingleTurnEnv:
    """One question, one answer, reward from ``grade(answer_text) -> (correct, formatted)``.

    reward = correct + format_coef * (formatted - 1): a well-formed wrong answer scores 0,
    a malformed one ``-format_coef`` (tinker-cookbook's convention).
    """

    messages: tuple[Message, ...]
    reference: str
    grader: GradeFn
    format_coef: float = 0.0

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def step(self, action: str) -> StepResult:
        correct, formatted = self.grader(action, self.reference)
        reward = float(correct) + self.format_coef * (float(formatted) - 1.0)
        return StepResult(
            reward=reward, episode_done=True, metrics={"correct": float(correct), "format": float(formatted)}
        )


class GradeFn(Protocol):
    def __call__(self, response: str, reference: str) -> tuple[bool, bool]: ...


@dataclass(frozen=True)
class SingleTurnBuilder:
    """``group_size`` copies of one single-turn env."""

    messages: tuple[Message, ...]
    reference: str
    grader: GradeFn
    format_coef: float = 0.0
    tag: str = "all"

    def make_envs(self, group_size: int) -> list[SingleTurnEnv]:
        env = SingleTurnEnv(self.messages, self.reference, self.grader, self.format_coef)
        return [env] * group_size  # stateless, so one instance serves the group
