"""The Env contract, group builders and RL datasets.

An Env is one episode: it gives the opening messages (and the tools the model may call),
then answers each action, the sampled reply parsed into content and tool calls, with a
StepResult (reward, done, the messages that follow when the episode goes on, such as a
tool's output). Envs are stepped in batches: :func:`step_envs` hands every env of one
class its actions of this turn in one :meth:`Env.step_batch` call, so a turn of 64
episodes grades 64 answers in one parallel grading call, or runs 64 tool calls at once in
the sandbox. The default ``step_batch`` just calls ``step`` per env.

A GroupBuilder makes the ``group_size`` envs of one problem; an RLDataset hands out the
builders of batch ``i`` as a pure function of ``i`` (so resuming at step ``i`` needs no replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from mathrl.grading import Grade, grade_batch
from mathrl.tools.formats import Tool
from mathrl.types import Action, Message, StepResult


class Env:
    """One episode. Subclasses give ``initial_messages`` and ``step`` (or ``step_batch``)."""

    tools: ClassVar[tuple[Tool, ...]] = ()
    """Tools the model may call; the renderer describes them and parses calls to them."""

    def initial_messages(self) -> list[Message]:
        raise NotImplementedError

    def step(self, action: Action) -> StepResult:
        """One action (an env that only batches: its ``step_batch`` of one)."""
        if getattr(type(self).step_batch, "__func__", None) is getattr(Env.step_batch, "__func__", None):
            raise NotImplementedError(f"{type(self).__name__} defines neither step nor step_batch")
        return type(self).step_batch([self], [action])[0]

    @classmethod
    def step_batch(cls, envs: Sequence[Env], actions: Sequence[Action]) -> list[StepResult]:
        """Step many envs of this class at once (override to batch grading or tool calls)."""
        return [env.step(action) for env, action in zip(envs, actions, strict=True)]

    def close(self) -> None:
        """Release what the episode holds (a sandbox session); called when it ends."""


def step_envs(envs: Sequence[Env], actions: Sequence[Action]) -> list[StepResult]:
    """Step every env with its action: one :meth:`Env.step_batch` call per env class."""
    results: list[StepResult | None] = [None] * len(envs)
    by_class: dict[type[Env], list[int]] = {}
    for i, env in enumerate(envs):
        by_class.setdefault(type(env), []).append(i)
    for cls, members in by_class.items():
        stepped = cls.step_batch([envs[i] for i in members], [actions[i] for i in members])
        for i, result in zip(members, stepped, strict=True):
            results[i] = result
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def answer_metrics(grade: Grade) -> dict[str, float]:
    """A graded final answer's metrics: correct, format (an answer was found), grader timeout."""
    return {"correct": float(grade.correct), "format": float(grade.answer is not None),
            "grader_timeout": float(grade.timed_out)}  # fmt: skip


class GroupBuilder(Protocol):
    """Makes the envs for one problem; the group's rewards are compared with each other."""

    @property
    def tag(self) -> str: ...

    def make_envs(self, group_size: int) -> Sequence[Env]: ...


class RLDataset(Protocol):
    def get_batch(self, index: int) -> Sequence[GroupBuilder]: ...

    def test_builders(self) -> Sequence[GroupBuilder]: ...


@dataclass(frozen=True, eq=False)
class SingleTurnEnv(Env):
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

    @classmethod
    def step_batch(cls, envs: Sequence[Env], actions: Sequence[Action]) -> list[StepResult]:
        """All answers of the turn graded in one parallel :func:`grade_batch` call."""
        singles = [env for env in envs if isinstance(env, SingleTurnEnv)]
        grades = grade_batch(
            [a.text for a in actions], [e.reference for e in singles], style=[e.style for e in singles]
        )
        results = []
        for env, action, grade in zip(singles, actions, grades, strict=True):
            formatted = grade.answer is not None
            reward = float(grade.correct) + env.format_coef * (float(formatted) - 1.0)
            reward -= env.length_penalty * action.num_tokens / 1000
            metrics = answer_metrics(grade)
            results.append(
                StepResult(reward, True, metrics=metrics, logs={"answer": grade.answer, "reference": env.reference})
            )
        return results


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
