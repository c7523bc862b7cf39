"""Tests for mathrl.config: conversion, layering of file and command line, and error messages."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mathrl.config import (
    ConfigError,
    config_from_dict,
    config_help,
    config_to_dict,
    diff_configs,
    parse_config,
)


@dataclass(frozen=True)
class DemoConfig:
    """One field of each supported kind; annotations are strings (future import) on purpose."""

    steps: int = field(default=100, metadata={"help": "Number of optimizer steps.", "min": 1})
    learning_rate: float = field(default=4e-5, metadata={"help": "Adam learning rate.", "min": 0.0})
    run_name: str = field(default="demo", metadata={"help": "Name of the run directory."})
    use_cache: bool = field(default=True, metadata={"help": "Reuse the KV cache."})
    max_tokens: int | None = field(default=None, metadata={"help": "Token cap; none for no cap."})
    temperature: float | None = field(default=1.0, metadata={"help": "Sampling temperature."})
    init_from: str | None = field(default=None, metadata={"help": "Checkpoint to start from."})
    reward: Literal["exact", "partial"] = field(default="exact", metadata={"help": "Reward function."})
    device: str = field(default="cuda", metadata={"help": "Where to run.", "choices": ("cpu", "cuda")})
    env_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "Environment arguments."})


@dataclass(frozen=True)
class RequiredConfig:
    data: str = field(metadata={"help": "Dataset path."})


def parse(*argv: str) -> DemoConfig:
    return parse_config(DemoConfig, list(argv))


def error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*argv)
    return str(info.value)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    cfg = parse()
    assert cfg == DemoConfig()
    assert (cfg.steps, cfg.learning_rate, cfg.run_name, cfg.use_cache) == (100, 4e-5, "demo", True)
    assert cfg.max_tokens is None and cfg.env_args == {}


@pytest.mark.parametrize(("text", "expected"), [("42", 42), ("1_000", 1000), ("+7", 7)])
def test_int(text: str, expected: int) -> None:
    value = parse(f"steps={text}").steps
    assert value == expected and type(value) is int


@pytest.mark.parametrize("text", ["1e3", "2.5", "abc", ""])
def test_int_rejects_non_integers(text: str) -> None:
    assert error(f"steps={text}") == f"steps: expected an int, got {text!r} (command line)"


@pytest.mark.parametrize(("text", "expected"), [("1e-4", 1e-4), ("3e-5", 3e-5), ("0.5", 0.5), ("2", 2.0)])
def test_float(text: str, expected: float) -> None:
    value = parse(f"learning_rate={text}").learning_rate
    assert value == expected and type(value) is float


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("YES", True), ("no", False)],
)
def test_bool(text: str, expected: bool) -> None:
    assert parse(f"use_cache={text}").use_cache is expected


def test_bool_rejects_other_words() -> None:
    message = error("use_cache=maybe")
    assert message.startswith("use_cache: expected a bool") and "'maybe'" in message


def test_str_keeps_everything_after_the_first_equals_sign() -> None:
    assert parse("run_name=a=b c").run_name == "a=b c"


def test_optional_fields() -> None:
    cfg = parse("max_tokens=512", "temperature=none", "init_from=runs/x")
    assert (cfg.max_tokens, cfg.temperature, cfg.init_from) == (512, None, "runs/x")
    assert parse("max_tokens=NULL").max_tokens is None
    assert "max_tokens: expected an int or none, got 'lots'" in error("max_tokens=lots")


def test_literal_accepts_a_choice_and_lists_choices_on_error() -> None:
    assert parse("reward=partial").reward == "partial"
    message = error("reward=fuzzy")
    assert message == "reward: expected one of 'exact', 'partial', got 'fuzzy' (command line)"


def test_choices_metadata() -> None:
    assert parse("device=cpu").device == "cpu"
    message = error("device=tpu")
    assert message.startswith("device:") and "'cpu', 'cuda'" in message and "'tpu'" in message


def test_min_is_inclusive() -> None:
    assert parse("steps=1").steps == 1
    assert parse("learning_rate=0").learning_rate == 0.0
    assert error("steps=0") == "steps: must be >= 1, got 0 (command line)"
    assert error("learning_rate=-1e-3").startswith("learning_rate: must be >= 0.0")


def test_bad_value_message_names_key_type_and_source() -> None:
    assert error("learning_rate=abc") == "learning_rate: expected a float, got 'abc' (command line)"


def test_unknown_key_suggests_closest() -> None:
    message = error("learning_rat=1e-4")
    assert "unknown key 'learning_rat' (command line)" in message
    assert "Did you mean 'learning_rate'?" in message
    assert "Did you mean 'env_args.x'?" in error("env_arg.x=1")
    assert "Valid keys: steps, learning_rate" in error("zzzzzz=1")


def test_missing_equals_and_empty_key() -> None:
    assert "expected key=value, got 'steps'" in error("steps")
    assert "expected key=value" in error("=3")


def test_duplicate_key() -> None:
    assert error("steps=1", "steps=2") == "key 'steps' given twice (command line)"
    assert "given twice" in error("env_args.a=1", "env_args.a=2")


def test_dotted_keys_set_dict_entries_with_yaml_scalars() -> None:
    cfg = parse("env_args.max_operand=20", "env_args.name=add", "env_args.flag=true", "env_args.scale=1e-3")
    assert cfg.env_args == {"max_operand": 20, "name": "add", "flag": True, "scale": 1e-3}
    assert type(cfg.env_args["max_operand"]) is int and type(cfg.env_args["scale"]) is float
    assert parse("env_args.ops=[1, 2").env_args == {"ops": "[1, 2"}  # not a scalar: the raw string


def test_dotted_entry_beats_whole_dict_regardless_of_order() -> None:
    cfg = parse("env_args.a=3", "env_args={a: 1, b: 2}")
    assert cfg.env_args == {"a": 3, "b": 2}


def test_dotted_key_on_non_dict_field_is_an_error() -> None:
    assert "steps is not a dict field" in error("steps.x=1")


def test_yaml_file_with_command_line_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        "steps: 7\nlearning_rate: 1e-4\nreward: partial\nuse_cache: false\nenv_args: {max_operand: 5, ops: add}\n",
    )
    cfg = parse("steps=9", "env_args.max_operand=20", f"config={path}")  # config= last: still overridden
    assert cfg.steps == 9
    assert cfg.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string; it must still become a float
    assert cfg.reward == "partial" and cfg.use_cache is False
    assert cfg.env_args == {"max_operand": 20, "ops": "add"}


def test_file_dotted_key_does_not_beat_command_line_dict(tmp_path: Path) -> None:
    path = write(tmp_path, "d.yaml", "env_args.a: 1\nenv_args: {b: 5}\n")
    assert parse(f"config={path}").env_args == {"a": 1, "b": 5}
    assert parse(f"config={path}", "env_args={a: 2}").env_args == {"a": 2, "b": 5}


def test_toml_file_with_command_line_override(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'steps = 7\nrun_name = "fromfile"\n\n[env_args]\nmax_operand = 5\n')
    cfg = parse(f"config={path}", "run_name=cli")
    assert (cfg.steps, cfg.run_name, cfg.env_args) == (7, "cli", {"max_operand": 5})


def test_file_values_are_type_checked(tmp_path: Path) -> None:
    assert parse(f"config={write(tmp_path, 'f.yaml', 'learning_rate: 3')}").learning_rate == 3.0
    path = write(tmp_path, "b.yaml", "steps: true\n")
    assert error(f"config={path}") == f"steps: expected an int, got True ({path})"
    path = write(tmp_path, "s.yaml", "run_name: 12\n")
    assert error(f"config={path}") == f"run_name: expected a string, got 12 ({path})"


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "u.yaml", "stpes: 3\n")
    message = error(f"config={path}")
    assert f"unknown key 'stpes' ({path})" in message and "'steps'" in message


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "steps: 3\nrun_name: [unclosed\n")
    message = error(f"config={path}")
    assert message.startswith(f"malformed YAML in {path}") and "line" in message


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", "steps = 3\nrun_name = \n")
    message = error(f"config={path}")
    assert message.startswith(f"malformed TOML in {path}") and "line 2" in message


def test_file_problems(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert error(f"config={missing}").startswith(f"cannot read config file {missing}")
    listing = write(tmp_path, "l.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping of keys, got list" in error(f"config={listing}")
    assert "expected a .yaml, .yml or .toml file" in error(f"config={write(tmp_path, 'c.json', '{}')}")
    assert "only allowed on the command line" in error(f"config={write(tmp_path, 'n.yml', 'config: x.yaml')}")
    assert parse(f"config={write(tmp_path, 'empty.yml', '')}") == DemoConfig()


def test_required_field() -> None:
    with pytest.raises(ConfigError, match="missing required key"):
        parse_config(RequiredConfig, [])
    assert parse_config(RequiredConfig, ["data=x.jsonl"]).data == "x.jsonl"


@pytest.mark.parametrize("columns", [60, 100])
def test_config_help_lists_every_key_wrapped_to_the_terminal(monkeypatch, columns) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    text = config_help(DemoConfig, "mathrl train")
    assert text.startswith("usage: mathrl train [config=FILE] [key=value ...]")
    assert max(len(line) for line in text.splitlines()) < columns  # a 358-character line was reported
    flat = " ".join(text.split())  # the help text, unwrapped
    for f in dataclasses.fields(DemoConfig):
        assert f"\n  {f.name}  " in text and " ".join(f.metadata["help"].split()) in flat
    for default in ("= 100", "= 4e-05", "= demo", "= true", "= none", "= exact", "= {}"):
        assert default in text
    assert "config=FILE" in text and "env_args.KEY=VALUE" in flat and "(min 1)" in text


def test_round_trip_through_json() -> None:
    cfg = parse("steps=5", "learning_rate=3e-5", "max_tokens=64", "reward=partial", "env_args.max_operand=20")
    saved = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(DemoConfig, saved, "runs/a/config.json") == cfg


def test_config_from_dict_validates_and_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"steps: must be >= 1, got 0 \(runs/a/config.json\)"):
        config_from_dict(DemoConfig, {"steps": 0}, "runs/a/config.json")
    with pytest.raises(ConfigError, match="unknown key 'old_key'"):
        config_from_dict(DemoConfig, {"old_key": 1}, "runs/a/config.json")


def test_frozen() -> None:
    cfg = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5  # type: ignore[misc]


def test_diff_configs() -> None:
    a = config_to_dict(parse("env_args.max_operand=20", "env_args.ops=add"))
    b = config_to_dict(parse("steps=5", "env_args.max_operand=30", "env_args.ops=add", "env_args.extra=1"))
    assert diff_configs(a, b) == ["steps", "env_args.max_operand", "env_args.extra"]
    assert diff_configs(a, a) == []
    assert diff_configs({"x": 1}, {}) == ["x"]
