"""Arithmetic: "What is x + y?" with a seeded stream of training problems.

Modelled on tinker-cookbook's arithmetic env: a one-shot example shows the answer
format, the reward is 1 when the last number of the answer equals the result (graded by
mathrl.grading, style "last_number"). The
operand range and the operators are options so the task can be made as hard as the
model needs. The held-out test set is a fixed seeded list of distinct problems, and
training never draws one of them: test accuracy measures generalisation to unseen sums.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mathrl.envs.base import SingleTurnBuilder
from mathrl.types import Message

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticConfig:
    min_operand: int = field(default=0, metadata={"help": "Smallest operand."})
    # 0..20 by default: the embedded 135M model gets ~25% of these right at the start and
    # learns them within the main job's budget; 0..100 (tinker's range) is one option away.
    max_operand: int = field(default=20, metadata={"help": "Largest operand (inclusive)."})
    operators: str = field(default="+", metadata={"help": "Operators to draw from, e.g. '+' or '+-*'."})
    test_size: int = field(default=200, metadata={"help": "Held-out test problems (fixed, seeded)."})
    test_seed: int = field(default=12345, metadata={"help": "Seed of the held-out test set."})
    one_shot: bool = field(default=True, metadata={"help": "Prefix one solved example."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    format_coef: float = field(default=0.0, metadata={"help": "Penalty for an answer with no integer."})

    def __post_init__(self) -> None:
        if self.min_operand > self.max_operand:
            raise ValueError(f"env_args.min_operand ({self.min_operand}) > env_args.max_operand ({self.max_operand})")
        bad = set(self.operators) - set(_OPS)
        if not self.operators or bad:
            raise ValueError(f"env_args.operators: expected characters from '+-*', got {self.operators!r}")


class ArithmeticDataset:
    """Batch ``i`` is drawn from ``Random((seed, i))``: a pure function of the step."""

    def __init__(self, cfg: ArithmeticConfig, groups_per_batch: int, seed: int):
        self.cfg = cfg
        self.groups_per_batch = groups_per_batch
        self.seed = seed
        span = cfg.max_operand - cfg.min_operand + 1
        space = span * span * len(set(cfg.operators))
        if space < 2 * cfg.test_size:
            raise ValueError(
                f"env_args: only {space} distinct problems for test_size={cfg.test_size}; "
                "widen min_operand..max_operand or lower test_size (training needs problems the test set lacks)"
            )
        rng = random.Random(f"arithmetic-test-{cfg.test_seed}")
        self._test: dict[tuple[int, str, int], None] = {}
        while len(self._test) < cfg.test_size:
            self._test.setdefault(self._draw(rng))

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        cfg = self.cfg
        x = rng.randint(cfg.min_operand, cfg.max_operand)
        y = rng.randint(cfg.min_operand, cfg.max_operand)
        return x, rng.choice(cfg.operators), y

    def _builder(self, problem: tuple[int, str, int]) -> SingleTurnBuilder:
        cfg = self.cfg
        x, op, y = problem
        messages: list[Message] = []
        if cfg.system_prompt:
            messages.append(Message("system", cfg.system_prompt))
        if cfg.one_shot:
            messages += [Message("user", "What is 4 + 5?"), Message("assistant", "9")]
        messages.append(Message("user", f"What is {x} {op} {y}?"))
        return SingleTurnBuilder(tuple(messages), str(_OPS[op](x, y)), "last_number", cfg.format_coef)

    def get_batch(self, index: int) -> list[SingleTurnBuilder]:
        rng = random.Random(f"arithmetic-train-{self.seed}-{index}")
        problems: list[tuple[int, str, int]] = []
        while len(problems) < self.groups_per_batch:
            if (p := self._draw(rng)) not in self._test:
                problems.append(p)
        return [self._builder(p) for p in problems]

    def test_builders(self) -> list[SingleTurnBuilder]:
        return [self._builder(p) for p in self._test]
