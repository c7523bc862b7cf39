"""Canonical LaTeX spelling of an answer: what two equal answers may differ in for
reasons of typography only (delimiters, spacing, ``\\left``, ``\\dfrac``, ``\\$``, ``\\%``,
degree signs, ``\\frac34`` shorthand, unicode symbols). Pure string functions, linear time.

Units and other words are not dropped here: :func:`split_words` separates them so the
matcher can tell "9 a.m." from "9 p.m.".
"""

from __future__ import annotations

import contextlib
import re

_REPLACE = [
    ("\\left", ""),
    ("\\right", ""),
    ("\\bigl", ""),
    ("\\bigr", ""),
    ("\\Bigl", ""),
    ("\\Bigr", ""),
    ("\\big", ""),
    ("\\Big", ""),
    ("\\displaystyle", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cfrac", "\\frac"),
    ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"),
    ("\\infinity", "\\infty"),
    ("\\varnothing", "\\emptyset"),
    ("\\mathbb{R}", "(-\\infty,\\infty)"),
    ("\\leqslant", "\\le"),
    ("\\geqslant", "\\ge"),
    ("\\leq", "\\le"),
    ("\\geq", "\\ge"),
    (">=", "\\ge "),
    ("<=", "\\le "),
    ("\\neq", "\\ne"),
    ("\\lbrace", "\\{"),
    ("\\rbrace", "\\}"),
    ("\\lbrack", "["),
    ("\\rbrack", "]"),
    ("\\mp", "\\pm"),
    ("−", "-"),
    ("–", "-"),
    ("×", "\\times "),
    ("·", "\\cdot "),
    ("÷", "\\div "),
    ("√", "\\sqrt"),
    ("π", "\\pi "),
    ("∞", "\\infty "),
    ("∪", "\\cup "),
    ("≤", "\\le "),
    ("≥", "\\ge "),
    ("°", "^\\circ"),
    ("\\degree", "^\\circ"),
    ("\u2044", "/"),  # fraction slash
    ("\u00a0", " "),
    ("\u200b", ""),  # zero-width space, joiners, word joiner, byte-order mark: invisible
    ("\u200c", ""),
    ("\u200d", ""),
    ("\u2060", ""),
    ("\ufeff", ""),
    *(
        (ch, f"\\frac{{{n}}}{{{d}}}")
        for ch, (n, d) in {
            "½": (1, 2),
            "⅓": (1, 3),
            "⅔": (2, 3),
            "¼": (1, 4),
            "¾": (3, 4),
            "⅕": (1, 5),
            "⅖": (2, 5),
            "⅗": (3, 5),
            "⅘": (4, 5),
            "⅙": (1, 6),
            "⅚": (5, 6),
            "⅐": (1, 7),
            "⅛": (1, 8),
            "⅜": (3, 8),
            "⅝": (5, 8),
            "⅞": (7, 8),
            "⅑": (1, 9),
            "⅒": (1, 10),
        }.items()
    ),  # unicode vulgar fractions; "3¾" becomes the mixed number 3\frac{3}{4}
]
_REPLACE_ASCII = [(old, new) for old, new in _REPLACE if old.isascii()]  # the common case: skip the rest
_REPLACE_UNICODE = [(old, new) for old, new in _REPLACE if not old.isascii()]
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad\b|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_TRIG = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)\b")
_TRIG_DEGREES = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^\s*\{?\s*\\circ\s*\}?|°)")
_PERCENT = re.compile(r"\\?%")
_DOLLAR = re.compile(r"\\\$|\$")
_FONT = re.compile(r"\\(?:mathbf|boldsymbol|bm|mathit|mathsf|mathnormal|emph)\s*\{")
_TEXT_FONT = re.compile(r"\\(?:textbf|textit|textrm|texttt|textsf|textnormal)\s*\{")  # text: may hold a unit
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT = re.compile(r"\\(?:text|mbox|textnormal|hbox|mathrm)\s*\{")
_UNIT_POWER = re.compile(r"\^\{?(\d)\}?")
_THOUSANDS_BRACE = re.compile(r"(\d)\{,\}(?=\d{3})")
_SPACES = re.compile(r"\s+")
_THOUSANDS_THIN = re.compile(r"(?<=\d),\s*\\!\s*(?=\d)")  # "10,\!080": the negative space joins the groups
_APPROX = re.compile(r"\\approx|\\simeq|≈")
# spaces around operators go, except after a comma between digits: "32, 349" is a list of two
# numbers (a thousands separator takes no space), so it must not become "32,349"
_OPERATOR_SPACES = re.compile(r"\s*([=+\-*/^_,()\[\]{}<>|&])(?:(?<=\d,)(?=\s+\d)|\s*)")


def normalize(answer: str) -> str:
    """Canonical spelling of ``answer``; equal typography gives equal strings."""
    s = answer.strip()
    s = _strip_delimiters(s)
    if not s.isascii():
        for old, new in _REPLACE_UNICODE:
            s = s.replace(old, new)
    for old, new in _REPLACE_ASCII if "\\" in s or "=" in s else ():  # commands, >= and <=
        s = s.replace(old, new)
    s = s.replace("\\left.", "").replace("\\right.", "").replace("{:}", ":")
    s = _TEXT_FONT.sub("\\\\text{", s)
    s = _APPROX.sub("=", s).lstrip("=").lstrip()
    s = _THOUSANDS_BRACE.sub(r"\1", s)
    s = _THOUSANDS_THIN.sub(",", s)
    s = _SPACING.sub(" ", s)
    if _TRIG.search(s):  # sin 30^\circ: degrees inside a function are radians * pi/180
        s = _TRIG_DEGREES.sub(r"(\1\\pi/180)", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub("", s)
    s = _DOLLAR.sub("", s)
    s = unwrap(s, _FONT)
    s = unwrap(s, _BOX)
    with contextlib.suppress(RecursionError):  # absurdly deep nesting: left as written
        s = brace_arguments(s)
    s = _SPACES.sub(" ", s).strip()
    s = _OPERATOR_SPACES.sub(r"\1", s)
    s = collapse_groups(s)
    while s.endswith("."):
        s = s[:-2].rstrip() if s.endswith("\\.") else s[:-1].rstrip()
    return s


_CLOSER = {"(": ")", "{": "}", "[": "]"}


def collapse_groups(s: str) -> str:
    """``((x))`` -> ``(x)``, ``{{5}}`` -> ``{5}``: a bracket pair directly inside a pair of the
    same kind adds nothing (and deep redundant nesting makes the LaTeX parser exponential).
    Unbalanced input is returned unchanged."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch in _CLOSER:
            stack.append(i)
        elif ch in ")}]":
            if not stack or _CLOSER[s[stack[-1]]] != ch:
                return s
            pairs[stack.pop()] = i
        i += 1
    if stack:
        return s
    drop = {k for i, j in pairs.items() if pairs.get(i + 1) == j - 1 and s[i + 1] == s[i] for k in (i + 1, j - 1)}
    return "".join(ch for k, ch in enumerate(s) if k not in drop) if drop else s


def _strip_delimiters(s: str) -> str:
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


_ARGUMENTS = {"\\frac": 2, "\\binom": 2, "\\sqrt": 1}
_COMMAND = re.compile(r"\\(frac|binom|sqrt)(?![A-Za-z])")


def brace_arguments(s: str) -> str:
    """``\\frac34`` -> ``\\frac{3}{4}``, ``\\frac\\pi2`` -> ``\\frac{\\pi}{2}``, ``\\sqrt3`` ->
    ``\\sqrt{3}``: LaTeX takes one token as an argument when there are no braces."""
    out: list[str] = []
    i = 0
    while (m := _COMMAND.search(s, i)) is not None:
        out.append(s[i : m.end()])
        j = m.end()
        for _ in range(_ARGUMENTS[m.group(0)]):
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "[" and m.group(1) == "sqrt":
                close = s.find("]", j)
                if close < 0:
                    break
                out.append(s[j : close + 1])
                j = close + 1
            if j >= len(s):
                break
            if s[j] == "{":
                end = matching_brace(s, j)
                if end is None:
                    break
                out.append("{" + brace_arguments(s[j + 1 : end]) + "}")
                j = end + 1
            elif s[j] == "\\":
                cmd = re.match(r"\\[A-Za-z]+|\\.", s[j:])
                token = cmd.group(0) if cmd else s[j]
                out.append("{" + token + "}")
                j += len(token)
            else:
                out.append("{" + s[j] + "}")
                j += 1
        i = j
    out.append(s[i:])
    return "".join(out)


def unwrap(s: str, command: re.Pattern[str]) -> str:
    """Replace ``\\cmd{content}`` by ``content`` for every match of ``command`` (which
    ends at the opening brace), by brace matching."""
    while True:
        m = command.search(s)
        if m is None:
            return s
        end = matching_brace(s, m.end() - 1)
        if end is None:
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + s[m.end() : end] + s[end + 1 :]


def matching_brace(s: str, open_at: int) -> int | None:
    """Index of the brace closing the one at ``open_at``; escaped braces do not count."""
    depth = 0
    i = open_at
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_WORD = re.compile(r"[A-Za-z][A-Za-z.'\-]*")


def split_words(s: str) -> tuple[str, tuple[str, ...]]:
    """(mathematical part, words): words come from ``\\text{...}``-style groups and from
    bare words of two or more letters after a number (``5 cm``, ``9 a.m.``). Words are
    lower-cased, without dots, singular (``inches`` -> ``inche``, consistently)."""
    words: list[str] = []
    out = []
    i = 0
    while True:
        m = _TEXT.search(s, i)
        if m is None:
            out.append(s[i:])
            break
        end = matching_brace(s, m.end() - 1)
        if end is None:
            out.append(s[i:])
            break
        out.append(s[i : m.start()] + " ")
        found = _WORD.findall(s[m.end() : end])
        leftover = _WORD.sub("", _SPACES.sub("", s[m.end() : end]))
        if re.search(r"\d", leftover):  # \text{9 a.m.} keeps its 9; \text{m/s} is all unit
            out.append(leftover + " ")
        i = end + 1
        power = _UNIT_POWER.match(s, i)
        if power and found:  # \text{cm}^2
            found[-1] += power.group(1)
            i = power.end()
        words.extend(found)
    math = "".join(out)
    tail = re.fullmatch(r"(.*?\d)\s*((?:[A-Za-z][A-Za-z.'\-]+(?:\^\{?\d\}?)?\s*)+)", math.strip())
    if tail and not re.search(r"\\[A-Za-z]*$", tail.group(1)):
        math = tail.group(1)
        words.extend(w + p for w, p in re.findall(r"([A-Za-z][A-Za-z.'\-]*)(?:\^\{?(\d)\}?)?", tail.group(2)))
    clean = tuple(w for w in (_canon_word(w) for w in words) if w)
    return _SPACES.sub(" ", math).strip(), clean


# a unit's abbreviation and its spelled-out names (singular, as _canon_word leaves them) are one word
_UNITS = {
    name: abbreviation
    for abbreviation, names in {
        "ft": ("feet", "foot", "ft"),
        "in": ("inch", "inche", "in"),
        "yd": ("yard", "yd"),
        "mi": ("mile", "mi"),
        "mm": ("millimeter", "millimetre", "mm"),
        "cm": ("centimeter", "centimetre", "cm"),
        "m": ("meter", "metre", "m"),
        "km": ("kilometer", "kilometre", "km"),
        "mg": ("milligram", "mg"),
        "g": ("gram", "g"),
        "kg": ("kilogram", "kg"),
        "lb": ("pound", "lb", "lbs"),
        "oz": ("ounce", "oz"),
        "ml": ("milliliter", "millilitre", "ml"),
        "l": ("liter", "litre", "l"),
        "s": ("second", "sec", "secs", "s"),
        "min": ("minute", "min", "mins"),
        "h": ("hour", "hr", "hrs", "h"),
    }.items()
    for name in names
}


def _canon_word(word: str) -> str:
    w = word.lower().replace(".", "").replace("'", "").strip("-")
    if len(w) > 3 and w.endswith("s"):
        w = w[:-1]
    unit = re.fullmatch(r"([a-z]+)(\d?)", w)
    if unit and unit.group(1) in _UNITS:  # "feet" and "ft", "km^2" and "kilometers^2"
        return _UNITS[unit.group(1)] + unit.group(2)
    return w
