"""Find the final answer in a model's response.

Policy: a response without a recognisable final answer has no answer (graded wrong); we
never fall back to "some number in the text". The answer is the content of the **last**
``\\boxed{}``/``\\fbox{}``, found by brace matching from the box itself, so unbalanced
braces elsewhere in the text cannot shift it. A box inside ``<think>...</think>`` counts
only when nothing after the block gives a final answer. ``style="gsm8k"`` also takes
``#### N`` and "The answer is N" (whichever comes last); ``style="last_number"`` takes the
last number in the text (the arithmetic env's convention).
"""

from __future__ import annotations

import re

from mathrl.grading.normalize import matching_brace

STYLES = ("boxed", "gsm8k", "last_number")

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_HASHES = re.compile(r"####[ \t]*:?[ \t]*([^\n]*\S)")  # the rest of the line: "#### 18 or 19" is hedged
_MONEY = r"(?:\\\$\s*|\$\s*)?"
# "The answer is 18", "answer: $18", "the answer is 2 + 4 = 6" (the value after the last "=")
_ANSWER_IS = re.compile(
    r"answer\**\s*(?:is\b|:)[\s*:]*(?:\$|\\\(|\\\[)?\s*" + _MONEY + r"(?P<first>" + _NUMBER + r")"
    r"(?:(?:\s*[-+*/×x÷]\s*" + _MONEY + r"(?:" + _NUMBER + r"))*\s*=\s*" + _MONEY + r"(?P<last>" + _NUMBER + r"))?",
    re.IGNORECASE,
)
_LAST_NUMBER = re.compile(_NUMBER)
_THINK_END = "</think>"


def extract_answer(response: str, style: str = "boxed") -> str | None:
    """The final answer in ``response`` (stripped), or None when it gives none."""
    if style not in STYLES:
        raise ValueError(f"extract_answer: unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if _THINK_END in response:
        after = response[response.rindex(_THINK_END) + len(_THINK_END) :]
        found = _find(after, style)
        if found is not None:
            return found[1]
    found = _find(response.replace(_THINK_END, "\n"), style)
    return found[1] if found is not None else None


def _find(text: str, style: str) -> tuple[int, str] | None:
    """(position, answer) of the last final answer in ``text`` for ``style``."""
    if style == "last_number":
        numbers = _LAST_NUMBER.findall(text)
        return (0, numbers[-1]) if numbers else None
    candidates: list[tuple[int, str | None]] = []
    boxes = list(_BOX.finditer(text))
    if boxes:
        last = boxes[-1]
        candidates.append((last.start(), _box_content(text, last.end())))
    if style == "gsm8k":
        hashes = list(_HASHES.finditer(text))
        if hashes:
            candidates.append((hashes[-1].start(), hashes[-1].group(1)))
        stated = list(_ANSWER_IS.finditer(text))
        if stated:
            candidates.append((stated[-1].start(), stated[-1].group("last") or stated[-1].group("first")))
    if not candidates:
        return None
    position, answer = max(candidates, key=lambda c: c[0])
    if answer is None or not answer.strip():
        return None
    return position, answer.strip()


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``: ``{...}`` by brace matching
    (escaped ``\\{``/``\\}`` do not count), or ``\\boxed 5`` (one token). None when the
    box is never closed (a cut-off response)."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    end = matching_brace(text, i)
    return text[i + 1 : end] if end is not None else None
