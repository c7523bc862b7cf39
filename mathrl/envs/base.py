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
from typing import Protocol, runtime_checkable

from mathrl.grading import Grade, grade_batch
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


@runtime_checkable
class GradedEnv(Env, Protocol):
    """An env whose step is the grading of its final answer. The runner grades a whole
    turn of such envs in one :func:`mathrl.grading.grade_batch` call (in parallel, under
    hard timeouts) and hands each its :class:`Grade`."""

    def grading_request(self, action: str) -> tuple[str, str, str]:
        """(response, reference, style) to grade."""
        ...

    def step_graded(self, action: str, grade: Grade, num_tokens: int = 0) -> StepResult: ...


@dataclass(frozen=True)
class SingleTurnEnv:
    """One question, one answer, graded by :mod:`mathrl.grading` against ``reference``.

    reward = correct + format_coef * (formatted - 1) - length_penalty * tokens / 1000,
    where formatted means a final answer was found: a well-formed wrong answer scores 0,
    one without a final answer ``-format_coef`` (tinker-cookbook's convention); the
    optional length penalty costs ``length_penalty`` per 1000 completion tokens.
    """

    messages: tuple[Message, ...]
    reference: str
    style: str = "boxed"
    format_coef: float = 0.0
    length_penalty: float = 0.0

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def grading_request(self, action: str) -> tuple[str, str, str]:
        return action, self.reference, self.style

    def step(self, action: str) -> StepResult:
        return self.step_graded(action, grade_batch([action], [self.reference], style=self.style)[0])

    def step_graded(self, action: str, grade: Grade, num_tokens: int = 0) -> StepResult:
        formatted = grade.answer is not None
        reward = float(grade.correct) + self.format_coef * (float(formatted) - 1.0)
        reward -= self.length_penalty * num_tokens / 1000
        metrics = {
            "correct": float(grade.correct),
            "format": float(formatted),
            "grader_timeout": float(grade.timed_out),
        }
        return StepResult(reward=reward, episode_done=True, metrics=metrics)


@dataclass(frozen=True)
class SingleTurnBuilder:
    """``group_size`` copies of one single-turn env."""

    messages: tuple[Message, ...]
    reference: str
    style: str = "boxed"
    format_coef: float = 0.0
    length_penalty: float = 0.0
    tag: str = "all"
    problem_id: str = ""

    def make_envs(self, group_size: int) -> list[SingleTurnEnv]:
        env = SingleTurnEnv(self.messages, self.reference, self.style, self.format_coef, self.length_penalty)
        return [env] * group_size  # stateless, so one instance serves the group
