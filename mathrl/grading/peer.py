"""math-verify (Hugging Face) as mathrl's grader, for results comparable with open-r1, lighteval
and TRL pipelines that reward with it: ``grader=math_verify`` in train, eval and distill.

Extraction follows those pipelines: for ``style=boxed`` math-verify finds the answer in the whole
response (LaTeX, ``\\boxed{}`` first, no unanchored guesses: TRL's ``accuracy_reward`` and open-r1's
configuration); for the other styles (``last_number``, ``gsm8k``), which math-verify has no notion
of, mathrl's extractor picks the answer and math-verify compares it. The reference is wrapped in
``$...$`` (as tinker-cookbook's ``grade_answer_math_verify``) so a bare answer parses as LaTeX.

Runs only inside a grading worker (:mod:`mathrl.grading.worker`), under the same hard deadline as
mathrl's symbolic comparisons; math-verify's own ``signal.alarm`` timeouts are turned off (they are
whole seconds and cannot interrupt one long C call). An optional dependency: ``pip install
'mathrl[math_verify]'``.
"""

from __future__ import annotations

import importlib.util
import logging

from mathrl.grading.extract import extract_answer

PACKAGE = "math-verify"
for _name in ("math_verify", "latex2sympy2_extended"):  # they log a warning per unparsable answer
    logging.getLogger(_name).setLevel(logging.ERROR)


def available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def wrap(text: str) -> str:
    """As tinker-cookbook's grade_answer_math_verify: ``$text$`` unless it starts or ends with ``$``."""
    return text if text.startswith("$") or text.endswith("$") else f"${text}$"


def matched_text(parsed: list[object]) -> str | None:
    """The text math-verify matched: ``parse`` returns [sympy object, matched string]; a sympy
    object is never str()-ed (printing one can take unbounded time)."""
    strings = [item for item in parsed if isinstance(item, str)]
    return strings[-1] if strings else None


def grade(response: str, reference: str, style: str) -> tuple[bool, str | None]:
    """(equal, the answer math-verify read) for one response against a bare reference."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    gold = parse(wrap(reference.strip()), extraction_mode="first_match", parsing_timeout=None)
    if style == "boxed":
        config = LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
        answer = parse(response, extraction_config=[config], extraction_mode="first_match", parsing_timeout=None)
    else:
        extracted = extract_answer(response, style)
        if extracted is None:
            return False, None
        answer = parse(wrap(extracted.strip()), extraction_mode="first_match", parsing_timeout=None)
    if not answer:
        return False, None
    text = matched_text(answer)
    if not gold:
        return False, text
    return bool(verify(gold, answer, timeout_seconds=None)), text
