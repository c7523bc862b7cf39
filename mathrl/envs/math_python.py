"""``env=math_python``: math problems the model may solve by calling a sandboxed Python tool.

Any math source: ``env_args.dataset=math|gsm8k|arithmetic|<file>`` with that source's own
options (levels, operators, operand ranges, ...). The model is told to use Python for
calculations and to put the final answer in ``\\boxed{}``; with ``one_shot`` (default) a
solved example shows one call, its result and the final reply. Each episode has its own
sandbox session (:mod:`mathrl.tools.python`), started at its first call.

An episode ends when the assistant replies without a tool call (its final reply, graded by
:mod:`mathrl.grading`), when a reply is cut by ``max_tokens``, when a reply calls the tool
after ``max_tool_calls`` calls (not run; the reply is graded as it is), or at ``max_turns``.
A call that cannot be parsed is answered with a tool message carrying the parse error.

reward = correct - error_coef x tool errors (every error kind but ``sandbox``, which is not
the model's doing); tool turns carry their errors' share, the final turn the correctness.
Per-turn metrics (summed per episode by the metrics code): ``num_tool_calls``,
``num_tool_errors``, ``num_tool_errors/<kind>``, ``num_state_lost``; the final turn has
``correct``, ``format`` (a final answer was found) and ``void`` (it had neither a tool call
nor a final answer). With ``drop_void_turns`` such episodes are left out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from mathrl.envs.arithmetic import ArithmeticConfig, ArithmeticDataset
from mathrl.envs.base import Env, SingleTurnBuilder, answer_metrics
from mathrl.envs.math import MathConfig, MathDataset
from mathrl.grading import grade_batch
from mathrl.sandbox import CHOICES as SANDBOX_CHOICES
from mathrl.sandbox import SandboxLimits
from mathrl.tools.formats import Tool
from mathrl.tools.python import (
    ERROR_KINDS,
    PYTHON,
    CallRecord,
    PythonSession,
    example_call,
    parse_error_message,
    result_message,
    run_calls,
)
from mathrl.types import Action, Message, StepResult

SYSTEM_PROMPT = (
    "Solve the problem. Use the python tool for every calculation (numpy and sympy are available), "
    "then give the final answer in \\boxed{}."
)


@dataclass(frozen=True)
class ToolOptions:
    """How the python tool behaves in an episode (``env_args`` of math_python; ``mathrl eval tools=python``)."""

    max_tool_calls: int = field(default=4, metadata={"help": "Tool calls per episode; a call past them ends it."})
    error_coef: float = field(default=0.1, metadata={"help": "Reward lost per tool error."})
    sandbox: str = field(default="auto", metadata={"help": f"Sandbox backend: {', '.join(SANDBOX_CHOICES)}."})
    tool_cpu_s: float = field(default=5.0, metadata={"help": "CPU seconds per tool call."})
    tool_wall_s: float = field(default=10.0, metadata={"help": "Wall-clock seconds per tool call."})
    tool_memory_mb: int = field(default=512, metadata={"help": "Memory of a tool session (MB)."})
    tool_output_chars: int = field(default=2000, metadata={"help": "Output of a call the model sees (chars)."})
    drop_void_turns: bool = field(
        default=False,
        metadata={"help": "Leave out of the loss episodes whose last reply has no tool call and no final answer."},
    )
    one_shot: bool = field(default=True, metadata={"help": "Prefix a solved example with one tool call."})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "System message (tool use instructions)."})

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOX_CHOICES:
            raise ValueError(f"env_args.sandbox: expected one of {', '.join(SANDBOX_CHOICES)}, got {self.sandbox!r}")
        if self.max_tool_calls < 1:
            raise ValueError(f"env_args.max_tool_calls: expected at least 1, got {self.max_tool_calls}")

    @property
    def limits(self) -> SandboxLimits:
        return SandboxLimits(
            cpu_s=self.tool_cpu_s, wall_s=self.tool_wall_s, memory_mb=self.tool_memory_mb,
            max_output_chars=self.tool_output_chars,
        )  # fmt: skip


@dataclass(frozen=True)
class MathPythonConfig(ToolOptions, MathConfig, ArithmeticConfig):
    """math_python's env_args: the source's options (math datasets' and arithmetic's) and the tool's."""

    dataset: str = field(default="math", metadata={"help": "Problems: math, gsm8k, arithmetic, any dataset or file."})

    def __post_init__(self) -> None:
        ToolOptions.__post_init__(self)
        ArithmeticConfig.__post_init__(self)


def tool_messages(question: str, options: ToolOptions) -> tuple[Message, ...]:
    """The opening of an episode: instructions, the optional solved example, the question."""
    messages = [Message("system", options.system_prompt)] if options.system_prompt else []
    if options.one_shot:
        call = example_call("print(12 * 34)")
        messages += [
            Message("user", "What is 12 * 34?"),
            Message("assistant", "", tool_calls=(call,)),
            Message("tool", "408", tool_call_id=call.id, name=PYTHON.name),
            Message("assistant", "12 * 34 = \\boxed{408}"),
        ]
    messages.append(Message("user", question))
    return tuple(messages)


@dataclass(eq=False)
class MathPythonEnv(Env):
    """One episode with the python tool (see the module docstring)."""

    tools: ClassVar[tuple[Tool, ...]] = (PYTHON,)
    messages: tuple[Message, ...]
    reference: str
    style: str
    options: ToolOptions
    calls_made: int = 0
    session: PythonSession | None = None

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    @classmethod
    def step_batch(cls, envs: Sequence[Env], actions: Sequence[Action]) -> list[StepResult]:
        """All tool calls of the turn at once (one session per episode), all final replies
        graded in one call."""
        mine = [env for env in envs if isinstance(env, MathPythonEnv)]
        tool_turns = [i for i, (env, a) in enumerate(zip(mine, actions, strict=True)) if env._calls_tool(a)]
        jobs = []
        for i in tool_turns:
            env = mine[i]
            env.session = env.session or PythonSession(env.options.limits, env.options.sandbox)
            jobs.append((env.session, actions[i].message.tool_calls))
        records = dict(zip(tool_turns, run_calls(jobs), strict=True))
        finals = [i for i in range(len(mine)) if i not in records]
        grades = grade_batch(
            [actions[i].message.content for i in finals], [mine[i].reference for i in finals],
            style=[mine[i].style for i in finals],
        )  # fmt: skip
        graded = dict(zip(finals, grades, strict=True))
        results = []
        for i, (env, action) in enumerate(zip(mine, actions, strict=True)):
            if i in records:
                results.append(env._tool_result(action, records[i]))
                continue
            grade = graded[i]
            void = grade.answer is None and not action.message.tool_calls
            metrics = {
                **answer_metrics(grade),
                "void": float(void),
                "over_budget": float(bool(action.message.tool_calls)),
            }
            if void and env.options.drop_void_turns:
                metrics["drop_trajectory"] = 1.0
            results.append(
                StepResult(
                    float(grade.correct),
                    True,
                    metrics=metrics,
                    logs={"answer": grade.answer, "reference": env.reference},
                )
            )
        return results

    def _calls_tool(self, action: Action) -> bool:
        """Whether this reply is a tool turn: calls (readable or not) within the budget."""
        attempts = len(action.message.tool_calls) + len(action.parse_errors)
        if action.truncated or not attempts:
            return False
        return self.calls_made + attempts <= self.options.max_tool_calls

    def _tool_result(self, action: Action, records: list[CallRecord]) -> StepResult:
        calls = action.message.tool_calls
        self.calls_made += len(calls) + len(action.parse_errors)
        messages = [result_message(c, r) for c, r in zip(calls, records, strict=True)]
        messages += [parse_error_message(e) for e in action.parse_errors]
        kinds = [r.error for r in records if r.error] + ["parse"] * len(action.parse_errors)
        penalized = sum(k != "sandbox" for k in kinds)
        metrics: dict[str, float] = {"correct": 0.0, "num_tool_calls": float(len(calls)),
                                     "num_tool_errors": float(penalized),
                                     "num_state_lost": float(sum(r.state_lost for r in records))}  # fmt: skip
        for kind in ERROR_KINDS:
            metrics[f"num_tool_errors/{kind}"] = float(kinds.count(kind))
        logs: dict[str, Any] = {"tool_calls": [r.as_dict() for r in records], "parse_errors": list(action.parse_errors)}
        return StepResult(-self.options.error_coef * penalized, False, tuple(messages), metrics, logs)


@dataclass(frozen=True)
class MathPythonBuilder:
    """``group_size`` fresh episodes of one problem (each with its own session)."""

    messages: tuple[Message, ...]
    reference: str
    style: str
    options: ToolOptions
    tag: str = "all"
    problem_id: str = ""

    def make_envs(self, group_size: int) -> list[MathPythonEnv]:
        return [MathPythonEnv(self.messages, self.reference, self.style, self.options) for _ in range(group_size)]


class MathPythonDataset:
    """The source dataset's batches and test set, each problem as a tool episode."""

    def __init__(self, cfg: MathPythonConfig, groups_per_batch: int, seed: int):
        self.cfg = cfg
        if cfg.dataset == "arithmetic":
            options = {f.name: getattr(cfg, f.name) for f in fields(ArithmeticConfig)}
            source = ArithmeticConfig(**{**options, "one_shot": False, "system_prompt": None})
            self.source: Any = ArithmeticDataset(source, groups_per_batch, seed)
        else:
            options = {f.name: getattr(cfg, f.name) for f in fields(MathConfig)}
            self.source = MathDataset(MathConfig(**{**options, "few_shot": 0, "system_prompt": ""}),
                                      groups_per_batch, seed, cfg.dataset)  # fmt: skip

    def builder(self, source: SingleTurnBuilder) -> MathPythonBuilder:
        question = source.messages[-1].content
        return MathPythonBuilder(tool_messages(question, self.cfg), source.reference, source.style, self.cfg,
                                 problem_id=source.problem_id)  # fmt: skip

    def get_batch(self, index: int) -> list[MathPythonBuilder]:
        return [self.builder(b) for b in self.source.get_batch(index)]

    def test_builders(self) -> list[MathPythonBuilder]:
        return [self.builder(b) for b in self.source.test_builders()]
