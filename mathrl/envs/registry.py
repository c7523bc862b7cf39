"""Env registry: name -> (options dataclass, dataset factory). A new env is one entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Any

from mathrl.envs.arithmetic import ArithmeticConfig, ArithmeticDataset
from mathrl.envs.base import RLDataset
from mathrl.envs.math import MathConfig, MathDataset, is_dataset_name
from mathrl.envs.math_python import MathPythonConfig, MathPythonDataset


@dataclass(frozen=True)
class EnvSpec:
    options: type
    make_dataset: Callable[..., RLDataset]  # (options, groups_per_batch, seed)
    description: str


def _math_env(name: str) -> Callable[..., RLDataset]:
    return lambda options, groups_per_batch, seed: MathDataset(options, groups_per_batch, seed, name)


ENVS: dict[str, EnvSpec] = {
    "arithmetic": EnvSpec(ArithmeticConfig, ArithmeticDataset, "What is x + y? (operands/operators are options)"),
    "math": EnvSpec(MathConfig, _math_env("math"), "Hendrycks MATH, boxed answers; tested on MATH-500"),
    "gsm8k": EnvSpec(MathConfig, _math_env("gsm8k"), "GSM8K word problems; boxed, '####' or 'The answer is N'"),
    "math_python": EnvSpec(
        MathPythonConfig, MathPythonDataset, "any math source (env_args.dataset) with a sandboxed python tool"
    ),
}
ANY_DATASET = "any dataset name, .jsonl/.json/.csv/.parquet file or hub id: a math env over it"


def _spec(name: str) -> EnvSpec:
    if name in ENVS:
        return ENVS[name]
    if is_dataset_name(name):
        return EnvSpec(MathConfig, _math_env(name), ANY_DATASET)
    hint = get_close_matches(name, ENVS, n=1)
    raise ValueError(
        f"env: unknown env {name!r}; known: {sorted(ENVS)} or {ANY_DATASET}"
        + (f". Did you mean {hint[0]!r}?" if hint else "")
    )


def env_options(name: str, args: Mapping[str, Any]) -> Any:
    """Build the env's options dataclass from ``env_args``, with errors that name the key."""
    spec = _spec(name)
    names = {f.name: f for f in fields(spec.options)}
    for key, value in args.items():
        if key not in names:
            hint = get_close_matches(key, names, n=1)
            raise ValueError(
                f"env_args.{key}: not an option of env {name!r}; options: {sorted(names)}"
                + (f". Did you mean 'env_args.{hint[0]}'?" if hint else "")
            )
        expected = type(names[key].default)
        if (
            names[key].default is not None
            and not isinstance(value, expected)
            and not (expected is float and isinstance(value, int) and not isinstance(value, bool))
        ):
            raise ValueError(f"env_args.{key}: expected {expected.__name__}, got {value!r}")
    return spec.options(**args)


def make_dataset(name: str, args: Mapping[str, Any], groups_per_batch: int, seed: int) -> tuple[RLDataset, Any]:
    options = env_options(name, args)
    return _spec(name).make_dataset(options, groups_per_batch, seed), options
