"""Math word problems from any dataset (MATH, GSM8K, MATH-500, a local file, a hub id).

Prompts follow tinker-cookbook's math env: the problem, then "Write your answer in
\\boxed{} format.", in the model's own chat template, with an optional system prompt
and few-shot prefix. The reward is 1 when the final answer equals the reference
(:mod:`mathrl.grading`), plus the optional format term and length penalty. Batch ``i``
is a pure function of (seed, i): the training set is shuffled once per epoch with a
seeded permutation, so resuming at step ``i`` needs no replay.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Literal

from mathrl.data.datasets import DATASETS, DataError, load_problems, parse_fields, split_list
from mathrl.envs.base import SingleTurnBuilder
from mathrl.prompts import TINKER_SUFFIX, math_messages
from mathrl.types import Problem


@dataclass(frozen=True)
class MathConfig:
    dataset: str = field(default="", metadata={"help": "Dataset name, file or hub id (default: the env name)."})
    split: str = field(default="train", metadata={"help": "Training split (math: train, test, train_12k)."})
    test_dataset: str = field(default="", metadata={"help": "Test set (default: math500 for math, else the dataset)."})
    test_split: str = field(default="test", metadata={"help": "Split of the test set."})
    test_limit: int = field(default=200, metadata={"help": "First N test problems for the periodic evaluation."})
    data_dir: str = field(default="", metadata={"help": "Directory with local files (or $MATHRL_DATA_DIR)."})
    fields: str = field(default="", metadata={"help": "Column mapping for other files, e.g. problem:question."})
    answer_from: str = field(default="field", metadata={"help": "Answer from: field, boxed (solution), hashes."})
    levels: str = field(default="", metadata={"help": "Keep only these MATH levels, e.g. '4,5'."})
    subjects: str = field(default="", metadata={"help": "Keep only these subjects, comma-separated."})
    limit: int = field(default=0, metadata={"help": "Use only the first N training problems (0 = all)."})
    suffix: str = field(default=TINKER_SUFFIX, metadata={"help": "Text appended to each problem."})
    few_shot: int = field(default=0, metadata={"help": "Solved examples before the problem (0-2)."})
    system_prompt: str = field(default="", metadata={"help": "Optional system message."})
    style: str = field(default="", metadata={"help": "Answer extraction: boxed, gsm8k (default by dataset)."})
    format_coef: float = field(default=0.0, metadata={"help": "Penalty for a response without a final answer."})
    length_penalty: float = field(default=0.0, metadata={"help": "Reward lost per 1000 completion tokens."})


AnswerStyle = Literal["boxed", "gsm8k"]


def load_split(cfg: MathConfig, name: str, split: str, train: bool) -> list[Problem]:
    """The problems of one split with the config's filters (the test set is never filtered)."""
    levels = split_list(cfg.levels)
    try:
        loaded = load_problems(
            name,
            split,
            data_dir=cfg.data_dir or None,
            fields=parse_fields(cfg.fields),
            answer_from=cfg.answer_from,  # type: ignore[arg-type]
            levels=[int(x) for x in levels] if levels and train else None,
            subjects=split_list(cfg.subjects) if train else None,
            limit=(cfg.limit or None) if train else cfg.test_limit or None,
        )
    except DataError as e:
        raise ValueError(f"env_args: {e}") from None
    if not loaded.problems:
        raise ValueError(f"env_args: no {split} problems left in {name} after the filters")
    print(f"{'train' if train else 'test'} data: {loaded.describe()}")
    return loaded.problems


class MathDataset:
    """Training batches and the held-out test builders of a math env."""

    def __init__(self, cfg: MathConfig, groups_per_batch: int, seed: int, env_name: str):
        self.cfg = cfg
        self.groups_per_batch = groups_per_batch
        self.seed = seed
        name = cfg.dataset or env_name
        self.style: AnswerStyle = cfg.style or ("gsm8k" if name == "gsm8k" else "boxed")  # type: ignore[assignment]
        if self.style not in ("boxed", "gsm8k"):
            raise ValueError(f"env_args.style: expected boxed or gsm8k, got {cfg.style!r}")
        self.train = load_split(cfg, name, cfg.split, train=True)
        test_name = cfg.test_dataset or ("math500" if name == "math" else name)
        self.test = load_split(cfg, test_name, cfg.test_split, train=False)
        overlap = {p.problem.strip() for p in self.test} & {p.problem.strip() for p in self.train}
        if overlap:
            print(f"warning: {len(overlap)} test problems also occur in the training data")

    def builder(self, problem: Problem) -> SingleTurnBuilder:
        cfg = self.cfg
        messages = math_messages(
            problem.problem, suffix=cfg.suffix, few_shot=cfg.few_shot, system_prompt=cfg.system_prompt or None
        )
        return SingleTurnBuilder(
            tuple(messages), problem.answer, self.style, cfg.format_coef, cfg.length_penalty, problem_id=problem.id
        )

    def get_batch(self, index: int) -> list[SingleTurnBuilder]:
        picks = []
        for k in range(index * self.groups_per_batch, (index + 1) * self.groups_per_batch):
            epoch, position = divmod(k, len(self.train))
            picks.append(self.train[self._order(epoch)[position]])
        return [self.builder(p) for p in picks]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one dataset per run)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        random.Random(f"math-{self.seed}-{epoch}").shuffle(order)
        return order

    def test_builders(self) -> list[SingleTurnBuilder]:
        return [self.builder(p) for p in self.test]


def is_dataset_name(name: str) -> bool:
    """Whether ``env=name`` means "a math env over dataset ``name``"."""
    return name in DATASETS or name.endswith((".jsonl", ".json", ".csv", ".parquet")) or "/" in name
