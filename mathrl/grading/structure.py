"""The shape of an answer: one expression, an unordered collection, an ordered tuple or
interval, named values, or a matrix.

The shape decides how two answers are compared: a bare list ``1, -2`` or a set
``\\{1, -2\\}`` is unordered (solutions of an equation; ``;`` separates solutions too, as in
``p=5,q=2;p=7,q=2``), ``\\pm`` is shorthand for two elements; an inequality in one variable
(``5 \\ge x``, ``-x > -1``, ``0 < f(x) < 1``) is the interval it describes; anything in
brackets is ordered and keeps its bracket kinds (``(1,2]`` is not ``(1,2)``); ``b=-3, c=0``
and ``(b, c) = (-3, 0)`` name their values. Parsing is pure string
work at top bracket level, linear in the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mathrl.grading.normalize import matching_brace


@dataclass(frozen=True)
class Atom:
    """One expression (may be an equation ``lhs = rhs``)."""

    text: str


@dataclass(frozen=True)
class Bag:
    """Unordered elements (a bare list, a set, a union of intervals, a ``\\pm`` pair)."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Seq:
    """Ordered elements between brackets: a point, vector, tuple or interval."""

    open: str
    close: str
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Named:
    """Values with names: ``b=-3, c=0`` or ``(b, c) = (-3, 0)``; order is the written one."""

    names: tuple[str, ...]
    values: tuple[Node, ...]


@dataclass(frozen=True)
class Matrix:
    rows: tuple[tuple[Node, ...], ...]


Node = Atom | Bag | Seq | Named | Matrix

NAME = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?'*|\\[a-zA-Z]+(?:_\{?[A-Za-z0-9]+\}?)?|[A-Za-z]\([A-Za-z]\)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACED_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_MATRIX = re.compile(r"[(\[]?\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}[)\]]?", re.DOTALL)
_CONJUNCTION = re.compile(r"\s*(?:\\text\{\s*(?:and|or)\s*\}|\b(?:and|or)\b)\s*")
_OPENERS = {"(": ")", "[": "]", "\\{": "\\}"}


def parse(text: str) -> list[Node]:
    """The readings of a normalized answer, most likely first. Usually one; a string
    like ``1,080`` is read both as one thousands-separated number and as a list."""
    readings: list[Node] = []
    if text.startswith("{") and matching_brace(text, 0) == len(text) - 1 and "," in text:
        text = text[1:-1]  # "{-1, 1}": braces that only group (a set written loosely)
    if _THOUSANDS.fullmatch(text) or _SPACED_THOUSANDS.fullmatch(text):  # "32, 349" is a list
        readings.append(Atom(text.replace(",", "").replace(" ", "")))
    readings.append(_parse(text, 0))
    return readings


def _parse(text: str, depth: int) -> Node:
    s = _CONJUNCTION.sub(",", text).strip().strip(",").strip()
    if depth > 20:
        return Atom(s)
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return Matrix(tuple(tuple(_parse(c, depth + 1) for c in row.split("&")) for row in rows))
    groups = [p for p in split_top(s, ";") if p.strip()]
    if len(groups) > 1:  # "(1,2); (3,4)", "p=5,q=2; p=7,q=2": solutions separated by semicolons
        return Bag(tuple(_parse(p, depth + 1) for p in groups))
    s = _strip_name_prefix(s)
    interval = _inequality(s)
    if interval is not None:
        return interval
    parts = split_top(s, "\\cup")
    if len(parts) > 1:
        return Bag(tuple(_parse(p, depth + 1) for p in parts))
    named = _named_tuple(s, depth)
    if named is not None:
        return named
    bracketed = _bracketed(s)
    if bracketed is not None:
        open_, inner, close = bracketed
        items = split_top(inner, ";") if len(split_top(inner, ";")) > 1 else split_top(inner, ",")
        if open_ == "\\{":
            return Bag(tuple(_parse(x, depth + 1) for p in items if p.strip() for x in _expand_pm(p)))
        if len(items) > 1:
            return Seq(open_, close, tuple(_parse(p, depth + 1) for p in items))
    parts = [p for p in split_top(s, ",") if p.strip()] or [s]
    if len(parts) > 1:
        assignments = [_assignment(p) for p in parts]
        if all(a is not None for a in assignments):
            names = tuple(a[0] for a in assignments if a is not None)
            values = tuple(_parse(a[1], depth + 1) for a in assignments if a is not None)
            if len(set(names)) == 1:
                return Bag(values)
            if len(set(names)) == len(names):
                return Named(names, values)
        first = assignments[0]
        if first is not None and all(a is None for a in assignments[1:]):
            parts = [first[1], *parts[1:]]
        return Bag(tuple(_parse(x, depth + 1) for p in parts for x in _expand_pm(p)))
    if len(_expand_pm(s)) == 2:
        return Bag(tuple(Atom(x) for x in _expand_pm(s)))
    if (
        bracketed is not None
        and bracketed[0] == "("
        and bracketed[2] == ")"
        and bracketed[1].strip()
        and not _bracketed(bracketed[1].strip())
    ):
        return Atom(bracketed[1].strip())
    return Atom(s)


_LESS = r"(<|\\le(?![a-z]))"
_GREATER = r"(>|\\ge(?![a-z]))"
_VAR = r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?"  # x, x_1, f(x)
_ONE_SIDED = re.compile(rf"(-?){_VAR}\s*(?:{_LESS}|{_GREATER})\s*([^<>=]+)")
_REVERSED = re.compile(rf"([^<>=]+?)\s*(?:{_LESS}|{_GREATER})\s*(-?){_VAR}")  # "5 \ge x" is "x \le 5"
_TWO_SIDED = re.compile(rf"([^<>=]+?)\s*{_LESS}\s*{_VAR}\s*{_LESS}\s*([^<>=]+)")


def _inequality(s: str) -> Seq | None:
    """``x \\le 3`` -> ``(-\\infty, 3]``, ``-1 < x \\le 2`` -> ``(-1, 2]``: the interval it describes."""
    m = _TWO_SIDED.fullmatch(s)
    if m:
        low, low_op, high_op, high = m.groups()
        return Seq(
            "[" if low_op != "<" else "(", "]" if high_op != "<" else ")", (Atom(low.strip()), Atom(high.strip()))
        )
    m = _ONE_SIDED.fullmatch(s)
    r = None if m else _REVERSED.fullmatch(s)
    if r and re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", r.group(1))):
        r = None  # "a+b < c" is a relation between letters, not a bound on one variable
    if m:
        minus, less, greater, bound = m.groups()
        upper = bool(less)  # x < bound: the bound is the upper end
    elif r:
        bound, less, greater, minus = r.groups()
        upper = bool(greater)  # bound > x: the variable on the right, the relation flips
    else:
        return None
    strict = (less or greater) in ("<", ">")
    bound = bound.strip()
    if minus:  # "-x > -1" is "x < 1"
        upper, bound = not upper, f"-({bound})"
    if upper:
        return Seq("(", ")" if strict else "]", (Atom("-\\infty"), Atom(bound)))
    return Seq("(" if strict else "[", ")", (Atom(bound), Atom("\\infty")))


def _expand_pm(s: str) -> list[str]:
    """``1\\pm\\sqrt5`` -> [``1+\\sqrt5``, ``1-\\sqrt5``] (one ``\\pm`` only)."""
    if s.count("\\pm") == 1:
        return [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    return [s]


def _strip_name_prefix(s: str) -> str:
    """``x \\in [2, 5)`` -> ``[2, 5)``; ``S = \\{1, 2\\}`` -> ``\\{1, 2\\}`` (a name before a
    bracketed structure, not a plain equation)."""
    m = re.match(r"\s*(" + NAME.pattern + r")\s*(?:=|\\in)\s*", s)
    if m and (s[m.end() :].startswith(("(", "[", "\\{")) or "\\in" in m.group(0)):
        rest = s[m.end() :]
        if _bracketed(rest) is not None or "\\cup" in rest or "\\in" in m.group(0):
            return rest
    return s


def _named_tuple(s: str, depth: int) -> Named | None:
    """``(b, c) = (-3, 0)``."""
    sides = split_top(s, "=")
    if len(sides) != 2:
        return None
    lhs, rhs = (_bracketed(side.strip()) for side in sides)
    if lhs is None or rhs is None:
        return None
    names = [n.strip() for n in split_top(lhs[1], ",")]
    values = split_top(rhs[1], ",")
    if len(names) < 2 or len(names) != len(values) or not all(NAME.fullmatch(n) for n in names):
        return None
    return Named(tuple(names), tuple(_parse(v, depth + 1) for v in values))


def _assignment(part: str) -> tuple[str, str] | None:
    sides = split_top(part, "=")
    if len(sides) == 2 and NAME.fullmatch(sides[0].strip()) and sides[1].strip():
        return sides[0].strip(), sides[1].strip()
    return None


def _bracketed(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when one bracket pair spans all of ``s``; intervals may mix
    ``(`` with ``]``."""
    for opener, closer in _OPENERS.items():
        if not s.startswith(opener):
            continue
        closers = (closer,) if opener == "\\{" else (")", "]")
        for c in closers:
            if s.endswith(c) and len(s) > len(opener) + len(c):
                inner = s[len(opener) : len(s) - len(c)]
                if _balanced(inner):
                    return opener, inner, c
    return None


def _balanced(s: str) -> bool:
    depth = 0
    i = 0
    while i < len(s):
        if s.startswith(("\\{", "\\}"), i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth < 0:
            return False
        i += 1
    return depth == 0


def split_top(s: str, sep: str) -> list[str]:
    """Split ``s`` at ``sep`` outside any brackets or braces. Intervals such as ``[1, 2)``
    are balanced by counting openers and closers of any kind."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(s):
        if s[i] == "\\":
            if s.startswith(sep, i) and depth == 0 and sep.startswith("\\"):
                parts.append(s[start:i])
                i += len(sep)
                start = i
                continue
            if s.startswith("\\{", i) or s.startswith("\\}", i):
                depth += 1 if s[i + 1] == "{" else -1
                i += 2
                continue
            m = re.match(r"\\[A-Za-z]+", s[i:])
            i += len(m.group(0)) if m else 2
            continue
        ch = s[i]
        if ch == "{":
            end = matching_brace(s, i)
            if end is None:
                return [s]
            i = end + 1
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts
