"""Answer extraction and mathematical equivalence: the reward of every mathrl task.

Public API (other tools call these; keep the signatures)::

    extract_answer(response, style="boxed") -> str | None
    answers_match(given, reference) -> bool
    grade_response(response, reference, style="boxed") -> bool
    grade_batch(responses, references, style="boxed", timeout=2.0) -> list[Grade]
    answers_match_batch(givens, references, timeout=2.0) -> list[Grade]
    use_grader(name)  # "mathrl" (default) or "math_verify": what grade_batch uses in this process

Every comparison finishes within ``timeout`` seconds of wall time: cheap checks run in
the caller's process, symbolic ones in worker processes that are killed at the deadline
(:mod:`mathrl.grading.pool`). A timeout counts as not equal and is reported in
:class:`Grade`. Layout: ``extract`` (final answer), ``normalize`` (typography),
``numbers`` (exact rationals), ``structure`` (lists, tuples, intervals, named values),
``match`` (the policy), ``symbolic`` (sympy), ``pool`` (deadlines), ``peer`` (math-verify as
the grader, ``grader=math_verify``: extraction and comparison as open-r1 and TRL do them, in the
same workers under the same deadlines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mathrl.grading import peer
from mathrl.grading.extract import STYLES, extract_answer
from mathrl.grading.match import NeedsSymbolic, match
from mathrl.grading.pool import shared_pool

DEFAULT_TIMEOUT = 2.0
GRADERS = {
    "mathrl": "mathrl's policy (mathrl.grading.match; the default)",
    "math_verify": "Hugging Face math-verify, as open-r1/TRL call it (extra [math_verify])",
}
GRADER_HELP = "Answer grader: " + "; ".join(f"{k}: {v}" for k, v in GRADERS.items()) + "."
_grader = "mathrl"

__all__ = [
    "DEFAULT_TIMEOUT",
    "GRADERS",
    "STYLES",
    "Grade",
    "answers_match",
    "answers_match_batch",
    "extract_answer",
    "grade_batch",
    "grade_response",
    "use_grader",
]


@dataclass(frozen=True)
class Grade:
    """One graded answer: the extracted answer (None: no final answer), whether it
    equals the reference, and whether the comparison ran out of time."""

    correct: bool
    answer: str | None
    timed_out: bool = False


def answers_match(given: str | None, reference: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether ``given`` equals ``reference`` mathematically (see :mod:`mathrl.grading.match`)."""
    return answers_match_batch([given], [reference], timeout=timeout)[0].correct


def grade_response(response: str, reference: str, style: str = "boxed", timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Extract the final answer of ``response`` and compare it with ``reference``."""
    return grade_batch([response], [reference], style=style, timeout=timeout)[0].correct


def use_grader(name: str) -> None:
    """Grade with ``name`` (a key of GRADERS) from now on in this process: a command's
    ``grader=`` option, set once at its start, reaches every env and evaluation that grades."""
    global _grader
    if name not in GRADERS:
        raise ValueError(f"grader: unknown {name!r}; expected one of {', '.join(GRADERS)}")
    if name == "math_verify" and not peer.available():
        raise ValueError(f"grader=math_verify needs {peer.PACKAGE}: pip install 'mathrl[math_verify]'")
    _grader = name


def grade_batch(
    responses: Sequence[str],
    references: Sequence[str],
    *,
    style: str | Sequence[str] = "boxed",
    timeout: float = DEFAULT_TIMEOUT,
    grader: str | None = None,
) -> list[Grade]:
    """:func:`grade_response` for many pairs; symbolic work runs in parallel workers.
    ``style`` is one answer style for all, or one per response; ``grader`` defaults to the
    process's (:func:`use_grader`)."""
    styles = [style] * len(responses) if isinstance(style, str) else list(style)
    if len(styles) != len(responses):
        raise ValueError(f"grade_batch: {len(styles)} styles for {len(responses)} responses")
    if (grader or _grader) == "math_verify":
        tasks = [["math_verify", r, ref, st] for r, ref, st in zip(responses, references, styles, strict=True)]
        replies = shared_pool().run(tasks, timeout) if tasks else []
        return [
            Grade(False, None, timed_out=True) if reply is None else Grade(bool(reply[0]), reply[1])
            for reply in replies
        ]
    answers = [extract_answer(r, st) for r, st in zip(responses, styles, strict=True)]
    return answers_match_batch(answers, references, timeout=timeout)


_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_SIZE = 100_000


def answers_match_batch(
    givens: Sequence[str | None], references: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT
) -> list[Grade]:
    """:func:`answers_match` for many pairs, each within ``timeout`` seconds."""
    if len(givens) != len(references):
        raise ValueError(f"answers_match_batch: {len(givens)} answers but {len(references)} references")
    verdicts: list[bool | None] = [None] * len(givens)
    symbolic: dict[tuple[str, str], list[int]] = {}
    for i, (given, reference) in enumerate(zip(givens, references, strict=True)):
        if given is None:
            verdicts[i] = False
            continue
        key = (given, reference)
        if key in _CACHE:
            verdicts[i] = _CACHE[key]
            continue
        try:
            verdicts[i] = match(given, reference, symbolic=False)
        except NeedsSymbolic:
            symbolic.setdefault(key, []).append(i)
    if symbolic:
        keys = list(symbolic)
        for key, verdict in zip(keys, shared_pool().run(keys, timeout), strict=True):
            if verdict is not None:
                if len(_CACHE) >= _CACHE_SIZE:
                    _CACHE.clear()
                _CACHE[key] = verdict
            for i in symbolic[key]:
                verdicts[i] = verdict
    return [
        Grade(correct=bool(v), answer=g, timed_out=v is None and g is not None)
        for v, g in zip(verdicts, givens, strict=True)
    ]
