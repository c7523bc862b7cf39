"""Exact rational values of numeric answers, without sympy.

Most answers are numbers: ``42``, ``-0.75``, ``\\frac{3}{4}``, ``6\\frac{3}{4}``, ``6 3/4``,
``0.\\overline{3}``, ``4.5e33``, ``4\\times10^{33}``, ``2^{10}-1``, a nested fraction.
:func:`parse_number` evaluates them exactly as :class:`fractions.Fraction` with a small
recursive-descent parser over ``+ - * / ^``, ``\\frac``, rational ``\\sqrt``, ``\\cdot``, ``\\times``, ``\\div`` and
brackets. Anything else (a letter, ``\\sqrt``, ``\\pi``) is not a plain number: None, and
the symbolic matcher decides. Time and memory are bounded: exponents and result sizes are
capped, so ``2^{2^{2^{100}}}`` is refused at once instead of evaluated.

A decimal literal also carries its precision (``1.6`` -> unit 0.1, ``4.5e33`` -> 1e32):
a rounded reference accepts a value that rounds to it (:func:`numbers_match`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_BITS = 4096  # numerator/denominator size we are willing to build
MAX_DEPTH = 120  # nesting depth in the caller's process; the grading workers allow more


@dataclass(frozen=True)
class Number:
    """An exact value, and the rounding unit when it was written as a rounded decimal."""

    value: Fraction
    unit: Fraction | None = None


class _Refuse(Exception):
    """Not a plain number, or too large to evaluate safely."""


_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<num>(?:\d+\.?\d*|\.\d+|\.(?=\\overline|\\dot))(?:\\overline\{\d+\}|\\dot\{?\d\}?)?(?:[eE][-+]?\d+)?)"
    r"|(?P<cmd>\\frac|\\sqrt|\\cdot|\\times|\\div)"
    r"|(?P<op>[-+*/^(){}\[\]])"
    r")"
)
_MIXED = re.compile(r"([-+]?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)/(\d+))")


def parse_number(text: str) -> Number | None:
    """The exact value of ``text`` when it is a plain number or numeric expression."""
    s = text.strip()
    if not s or len(s) > 20_000:
        return None
    mixed = _MIXED.fullmatch(s)
    if mixed:
        sign, whole, num, den = (
            mixed.group(1),
            mixed.group(2),
            mixed.group(3) or mixed.group(5),
            mixed.group(4) or mixed.group(6),
        )
        if int(den) != 0 and int(num) < int(den):
            value = int(whole) + Fraction(int(num), int(den))
            return Number(-value if sign == "-" else value)
        return None
    try:
        tokens = _tokenize(s)
        parser = _Parser(tokens)
        value = parser.expr(0)
        if parser.pos != len(tokens):
            return None
    except (_Refuse, ZeroDivisionError, ValueError):
        return None
    return Number(value, _unit_of(s))


def numbers_match(given: Number, reference: Number) -> bool:
    """Exact equality; or, for a rounded decimal reference, a given value at least as
    precise that rounds to it (``1.62`` or ``\\frac{13}{8}`` for ``1.6``; not ``0.3`` for ``0.33``)."""
    if given.value == reference.value:
        return True
    unit = reference.unit
    if unit is None:
        return False
    if given.unit is not None and given.unit > unit:
        return False
    return abs(given.value - reference.value) <= unit / 2


_DECIMAL = re.compile(r"[-+]?\d*\.(\d+)(?:(?:[eE]([-+]?\d+))|\s*(?:\\times|\\cdot)\s*10\^\{?([-+]?\d+)\}?)?")


def _unit_of(s: str) -> Fraction | None:
    m = _DECIMAL.fullmatch(s)
    if m is None:
        return None
    exponent = int(m.group(2) or m.group(3) or 0)
    return Fraction(10) ** (exponent - len(m.group(1)))


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if m is None or m.end() == i:
            if s[i:].strip() == "":
                break
            raise _Refuse
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        i = m.end()
    return tokens


def _literal(text: str) -> Fraction:
    m = re.fullmatch(r"(.*?)(?:[eE]([-+]?\d+))?", text)
    assert m is not None
    mantissa, exponent = m.group(1), int(m.group(2) or 0)
    if abs(exponent) > 1000:
        raise _Refuse
    repeat = re.search(r"\\overline\{(\d+)\}|\\dot\{?(\d)\}?", mantissa)
    if repeat:
        digits = repeat.group(1) or repeat.group(2)
        head = mantissa[: repeat.start()]
        if "." not in head:
            raise _Refuse
        whole, frac = head.split(".")
        base = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        value = base + Fraction(int(digits), (10 ** len(digits) - 1) * 10 ** len(frac))
    else:
        value = Fraction(mantissa)
    return value * Fraction(10) ** exponent


def _check(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise _Refuse
    return value


class _Parser:
    """Precedence climbing over the token list; every node is an exact Fraction."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise _Refuse
        token = self.tokens[self.pos]
        if expected is not None and token[1] != expected:
            raise _Refuse
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise _Refuse
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            rhs = self.term(depth)
            value = _check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek() in ("*", "/", "\\cdot", "\\times", "\\div"):
            op = self.take()[1]
            rhs = self.unary(depth)
            value = _check(value / rhs if op in ("/", "\\div") else value * rhs)
        return value

    def unary(self, depth: int) -> Fraction:
        if self.peek() in ("-", "+"):
            op = self.take()[1]
            value = self.unary(depth)
            return -value if op == "-" else value
        return self.power(depth)

    def power(self, depth: int) -> Fraction:
        base = self.atom(depth)
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.atom(depth + 1)
        if exponent.denominator != 1 or abs(exponent.numerator) > 10_000:
            raise _Refuse
        e = exponent.numerator
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size * abs(e) > MAX_BITS:
            raise _Refuse
        return _check(base**e)

    def atom(self, depth: int) -> Fraction:
        kind, text = self.take()
        if kind == "num":
            return _check(_literal(text))
        if text in ("(", "{", "["):
            close = {"(": ")", "{": "}", "[": "]"}[text]
            value = self.expr(depth + 1)
            self.take(close)
            return value
        if text == "\\frac":
            num = self.atom(depth + 1)
            den = self.atom(depth + 1)
            return _check(num / den)
        if text == "\\sqrt" and self.peek() != "[":
            return _exact_sqrt(self.atom(depth + 1))
        raise _Refuse


def _exact_sqrt(value: Fraction) -> Fraction:
    """The square root when it is rational (``\\sqrt{16}``, ``\\sqrt{\\frac{9}{4}}``); else the
    expression is not a plain number."""
    if value < 0:
        raise _Refuse
    num, den = math.isqrt(value.numerator), math.isqrt(value.denominator)
    if num * num != value.numerator or den * den != value.denominator:
        raise _Refuse
    return Fraction(num, den)


_TOWER = re.compile(r"(\d{1,15})\^(?:\{(.+)\}|(\d+))")
TOWER_EXPONENT_BITS = 1 << 16  # an inner level is evaluated only up to this size
MAX_TOWER_LEVELS = 6


def parse_tower(text: str) -> tuple[int, int] | None:
    """``a^{b^{c}}`` of positive integers as (p, e) with value ``p**e`` and ``p`` not a perfect
    power, so two towers are equal exactly when their pairs are (``2^{2^{100}}`` is
    ``4^{2^{99}}``), without building the number. None when ``text`` is not such a tower or
    its exponent is itself too large to evaluate."""
    if text.count("^") > MAX_TOWER_LEVELS:  # bounds the recursion and the work: linear in the input
        return None
    m = _TOWER.fullmatch(text.strip())
    if m is None or int(m.group(1)) < 2:
        return None
    exponent = _positive_int(m.group(2) or m.group(3))
    if exponent is None:
        return None
    root, k = _primitive_root(int(m.group(1)))
    return root, k * exponent


def _positive_int(text: str) -> int | None:
    number = parse_number(text)
    if number is not None:
        value = number.value
        return int(value) if value.denominator == 1 and value > 0 else None
    tower = parse_tower(text)
    if tower is None or tower[1] * tower[0].bit_length() > TOWER_EXPONENT_BITS:
        return None
    return int(tower[0] ** tower[1])


def _primitive_root(n: int) -> tuple[int, int]:
    """(r, k) with ``r**k == n`` and k as large as possible (``64`` -> (2, 6))."""
    for k in range(n.bit_length(), 1, -1):
        r = round(n ** (1 / k))
        for c in (r - 1, r, r + 1):
            if c > 1 and c**k == n:
                root, j = _primitive_root(c)
                return root, j * k
    return n, 1
