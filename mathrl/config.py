"""Typed ``key=value`` configuration for mathrl entrypoints.

Each entrypoint declares one frozen dataclass whose fields carry a default and
``metadata={"help": ...}`` (optionally ``"min"``/``"max"``, inclusive, and ``"choices"``).
:func:`parse_config` builds it from command-line ``key=value`` items, layered over an
optional YAML/TOML file given as ``config=FILE``. Every value, whatever its origin, goes
through the same conversion and validation, so a typo or a bad value fails at startup
(not hours into a run) with a message naming the key, where it came from and what was
expected. Pure Python on purpose: ``--help`` must not pay for importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import textwrap
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "config_from_dict", "config_help", "config_to_dict", "diff_configs", "parse_config"]

T = TypeVar("T")
CLI = "command line"
_TRUE, _FALSE, _NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # YAML 1.1 reads "1e-4" as a string
_EXPECTED = {int: "an int", float: "a float", bool: "a bool (true/false/1/0/yes/no)", str: "a string"}
_ABSENT = object()


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key, its source and the expectation."""


def option(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: ``field(default=1, metadata=option("Help text.", min=1))``."""
    return {"help": text, **extra}


def _optional_inner(tp: Any) -> Any:
    """Return ``X`` for an ``X | None`` annotation, None for any other annotation."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    args = get_args(tp)
    if len(args) != 2 or type(None) not in args:
        raise TypeError(f"unsupported config annotation {tp!r}: only X | None unions are allowed")
    return next(a for a in args if a is not type(None))


def _is_dict(tp: Any) -> bool:
    return tp is dict or get_origin(tp) is dict


def _type_name(tp: Any) -> str:
    """Short type name for the help text, e.g. ``int|None`` or ``{exact,partial}``."""
    if (inner := _optional_inner(tp)) is not None:
        return f"{_type_name(inner)}|None"
    if get_origin(tp) is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    return "dict" if _is_dict(tp) else getattr(tp, "__name__", str(tp))


def _expected(tp: Any) -> str:
    """What a value of ``tp`` looks like, for error messages."""
    if (inner := _optional_inner(tp)) is not None:
        return f"{_expected(inner)} or none"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return "a mapping" if _is_dict(tp) else _EXPECTED[tp]


def _convert(tp: Any, value: Any) -> Any:
    """Convert a raw command-line string or an already-typed file value to ``tp``.

    Raises ValueError when the value does not fit, TypeError for an unsupported annotation.
    Strings are parsed whatever their source, so a YAML ``lr: 1e-4`` (a string to YAML 1.1)
    still works; typed values are checked strictly (a bool is not an int, an int is a float).
    """
    if (inner := _optional_inner(tp)) is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _convert(inner, value)
    if get_origin(tp) is Literal:
        if isinstance(value, str) and value in (choices := {str(c): c for c in get_args(tp)}):
            return choices[value]
        raise ValueError(value)
    if _is_dict(tp):
        if isinstance(value, str):  # a whole mapping on the command line: env_args='{a: 1}'
            value = _yaml_or_raw(value)
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ValueError(value)
    if tp not in _EXPECTED:
        raise TypeError(f"unsupported config annotation {tp!r}")
    if isinstance(value, str):
        if tp is bool:
            if value.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(value)
            return value.strip().lower() in _TRUE
        return tp(value)  # int() accepts "1_000" but not "1e3"; float() accepts "3e-5"
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)  # an int is fine where a float is expected
    if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value  # but a bool is not an int
    raise ValueError(value)


def _yaml_or_raw(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_scalar(text: str) -> Any:
    """Read a command-line value for a dict entry as a YAML scalar (``20`` → int, ``true`` → bool).

    Anything that is not a plain scalar (a list, a mapping, a date) stays the raw string.
    """
    value = _yaml_or_raw(text) if text.strip() else text
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(text.strip()):
        return float(text)
    return value if value is None or isinstance(value, bool | int | float | str) else text


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Map each init field name of the dataclass ``cls`` to (field, resolved annotation)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else _ABSENT


def _unknown(key: str, fields: Mapping[str, tuple[dataclasses.Field[Any], Any]], source: str) -> ConfigError:
    """Error for an unknown key, suggesting the closest valid key(s)."""
    if key == "config":
        return ConfigError(f"'config' is only allowed on the command line ({source})")
    name, dot, sub = key.partition(".")
    dict_names = [n for n, (_, tp) in fields.items() if _is_dict(tp)]
    close = [f"{n}.{sub}" for n in difflib.get_close_matches(name, dict_names, n=3)] if dot else []
    close = close or difflib.get_close_matches(key, list(fields), n=3)
    hint = f"Did you mean {' or '.join(map(repr, close))}?" if close else "Valid keys: " + ", ".join(fields)
    return ConfigError(f"unknown key {key!r} ({source}). {hint}")


def _check(name: str, f: dataclasses.Field[Any], value: Any, source: str) -> None:
    """Apply the field's ``min``/``max``/``choices`` metadata."""
    meta = f.metadata
    if value is None:
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{name}: must be >= {meta['min']}, got {value!r} ({source})")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{name}: must be <= {meta['max']}, got {value!r} ({source})")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(map(repr, meta["choices"]))
        raise ConfigError(f"{name}: expected one of {choices}, got {value!r} ({source})")


def _build(cls: type[T], items: Sequence[tuple[str, Any, str]]) -> T:
    """Apply ``(key, value, source)`` items, source by source, over the defaults and construct ``cls``.

    Within one source, whole values apply before dotted ones whatever their order. A whole mapping
    for a dict field merges into its current entries and a dotted key sets one entry, so a file's
    entries survive a single command-line override.
    """
    fields = _fields(cls)
    values: dict[str, Any] = {}
    rank = {source: i for i, source in enumerate(dict.fromkeys(source for _, _, source in items))}
    for key, raw, source in sorted(items, key=lambda item: (rank[item[2]], "." in item[0])):
        name, dot, sub = key.partition(".")
        if name not in fields:
            raise _unknown(key, fields, source)
        f, tp = fields[name]
        if dot and not (_is_dict(tp) and sub):
            raise ConfigError(f"{key}: {name} is not a dict field, so {name}.KEY is not allowed ({source})")
        try:
            value = {sub: raw} if dot else _convert(tp, raw)
        except ValueError:
            raise ConfigError(f"{name}: expected {_expected(tp)}, got {raw!r} ({source})") from None
        _check(name, f, value, source)
        if _is_dict(tp):
            base = values.get(name, _default(f))
            value = {**({} if base is _ABSENT else base), **value}
        values[name] = value
    missing = [n for n, (f, _) in fields.items() if n not in values and _default(f) is _ABSENT]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    return cls(**values)


def _load_file(path: str) -> dict[str, Any]:
    """Read a YAML/TOML config file whose top level is a mapping of key to value."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path}: expected a .yaml, .yml or .toml file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as e:  # its message already says "(at line L, column C)"
        raise ConfigError(f"malformed TOML in {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', None) or e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of keys, got {type(data).__name__}")
    if bad := [k for k in data if not isinstance(k, str)]:
        raise ConfigError(f"config file {path}: keys must be strings, got {bad[0]!r}")
    return data


def parse_config(cls: type[T], argv: Sequence[str]) -> T:
    """Build ``cls`` from ``key=value`` items; ``config=FILE`` loads a file first, which any
    command-line key overrides regardless of order. Dotted ``field.entry=value`` sets one
    entry of a dict field, its value read as a YAML scalar. Raises ConfigError on any mistake.
    """
    given: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {arg!r} ({CLI})")
        if key in given:
            raise ConfigError(f"key {key!r} given twice ({CLI})")
        given[key] = value
    items: list[tuple[str, Any, str]] = []
    if (path := given.pop("config", None)) is not None:
        items += [(k, v, path) for k, v in _load_file(path).items()]
    items += [(k, _parse_scalar(v) if "." in k else v, CLI) for k, v in given.items()]
    return _build(cls, items)


def _show(value: Any) -> str:
    """A default as the user would type it on the command line."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return (value or "''") if isinstance(value, str) else str(value)


def config_help(cls: type, prog: str) -> str:
    """Usage text listing every key with its type, default and help, in aligned columns."""
    rows = [("config", "FILE", "", "YAML/TOML file of key: value loaded first; command-line keys override it.")]
    for name, (f, tp) in _fields(cls).items():
        default = _default(f)
        text = f.metadata.get("help", "")
        limits = [f"{k} {f.metadata[k]}" for k in ("min", "max") if k in f.metadata]
        if "choices" in f.metadata:
            limits.append("one of " + ", ".join(map(str, f.metadata["choices"])))
        text += f" ({'; '.join(limits)})" if limits else ""
        text += f" Set one entry with {name}.KEY=VALUE." if _is_dict(tp) else ""
        rows.append((name, _type_name(tp), "(required)" if default is _ABSENT else f"= {_show(default)}", text))
    width = max(shutil.get_terminal_size((100, 24)).columns, 40)
    lines = [f"usage: {prog} [config=FILE] [key=value ...]", "", "keys:"]
    for name, kind, default, text in rows:
        lines += textwrap.wrap(f"{name}  {kind}  {default}", width - 1, initial_indent="  ", subsequent_indent=" " * 6)
        lines += textwrap.wrap(text, width - 1, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-serialisable dict (saved as config.json in a run directory)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"{cfg!r} is not a dataclass instance")
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], d: Mapping[str, Any], source: str) -> T:
    """Rebuild ``cls`` from a dict (e.g. a reloaded config.json) with the same checks as a file."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(d).__name__}")
    return _build(cls, [(str(k), v, source) for k, v in d.items()])


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts, nested dicts reported as dotted keys.

    A key present on one side only counts as differing. Used to warn when resuming a run with
    a config that is not the one it was started with.
    """
    out: list[str] = []
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += [f"{key}.{sub}" for sub in diff_configs(va, vb)]
        elif va is _ABSENT or vb is _ABSENT or va != vb:
            out.append(key)
    return out
