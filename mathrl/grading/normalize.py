"""Canonical LaTeX spelling of an answer: what two equal answers may differ in for
reasons of typography only (delimiters, spacing, ``\\left``, ``\\dfrac``, ``\\$``, ``\\%``,
degree signs, ``\\frac34`` shorthand, unicode symbols). Pure string functions, linear time.

Units and other words are not dropped here: :func:`split_words` separates them so the
matcher can tell "9 a.m." from "9 p.m.".
"""

from __future__ import annotations

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
    ("\\leq", "\\le"),
    ("\\geq", "\\ge"),
    ("\\leqslant", "\\le"),
    ("\\geqslant", "\\ge"),
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
]
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_PERCENT = re.compile(r"\\?%")
_DOLLAR = re.compile(r"\\\$|\$")
_FONT = re.compile(r"\\(?:mathbf|boldsymbol|bm|mathit|mathsf|mathrm|mathnormal|textbf|textit|textrm|texttt|emph)\s*\{")
_TEXT = re.compile(r"\\(?:text|mbox|textnormal|hbox|operatorname)\s*\{")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)|\\frac\s*(\d)\s*(?=\{)|\\frac\s*(\{[^{}]*\})\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d|[a-zA-Z](?![a-zA-Z]))")
_THOUSANDS_BRACE = re.compile(r"(\d)\{,\}(?=\d{3})")
_SPACES = re.compile(r"\s+")
_OPERATOR_SPACES = re.compile(r"\s*([=+\-*/^_,()\[\]{}<>|&])\s*")


def normalize(answer: str) -> str:
    """Canonical spelling of ``answer``; equal typography gives equal strings."""
    s = answer.strip()
    s = _strip_delimiters(s)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = _THOUSANDS_BRACE.sub(r"\1", s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub("", s)
    s = _DOLLAR.sub("", s)
    s = unwrap(s, _FONT)
    s = _FRAC_SHORT.sub(_fix_frac, s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _SPACES.sub(" ", s).strip()
    s = _OPERATOR_SPACES.sub(r"\1", s)
    while s.endswith("."):
        s = s[:-2].rstrip() if s.endswith("\\.") else s[:-1].rstrip()
    return s


def _strip_delimiters(s: str) -> str:
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _fix_frac(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if m.group(3) is not None:
        return f"\\frac{{{m.group(3)}}}"
    return f"\\frac{m.group(4)}{{{m.group(5)}}}"


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
        words.extend(_WORD.findall(s[m.end() : end]))
        rest = _SPACES.sub("", s[m.end() : end])
        leftover = _WORD.sub("", rest)
        if leftover:
            out.append(leftover + " ")
        i = end + 1
    math = "".join(out)
    tail = re.fullmatch(r"(.*?\d)\s*((?:[A-Za-z][A-Za-z.'\-]+\s*)+)", math.strip())
    if tail and not re.search(r"\\[A-Za-z]*$", tail.group(1)):
        math = tail.group(1)
        words.extend(_WORD.findall(tail.group(2)))
    clean = tuple(w for w in (_canon_word(w) for w in words) if w)
    return _SPACES.sub(" ", math).strip(), clean


def _canon_word(word: str) -> str:
    w = word.lower().replace(".", "").replace("'", "").strip("-")
    if len(w) > 3 and w.endswith("s"):
        w = w[:-1]
    return w
