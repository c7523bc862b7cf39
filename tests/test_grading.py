"""mathrl.grading: extraction, equivalence policy, hard timeouts, the batch form, and the
labelled suite of real answers (tests/data/grading_cases.jsonl)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mathrl.grading import (
    answers_match,
    answers_match_batch,
    extract_answer,
    grade_batch,
    grade_response,
)
from mathrl.grading.match import NeedsSymbolic, match
from mathrl.grading.numbers import Number, numbers_match, parse_number, parse_tower
from mathrl.grading.pool import GradingPool

CASES = Path(__file__).parent / "data" / "grading_cases.jsonl"


def _cases() -> list[dict]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def test_labelled_suite_is_big_balanced_and_real():
    cases = _cases()
    assert len(cases) >= 300
    share_true = sum(c["expected"] for c in cases) / len(cases)
    assert 0.35 < share_true < 0.65
    assert len({c["id"] for c in cases}) == len(cases)


@pytest.fixture(scope="module")
def suite_verdicts() -> dict[str, tuple[bool, bool]]:
    """(graded correct, timed out) per case id, graded in batches like the trainer does."""
    cases = _cases()
    out: dict[str, tuple[bool, bool]] = {}
    answers = [c for c in cases if c["kind"] == "answer"]
    grades = answers_match_batch([c["given"] for c in answers], [c["reference"] for c in answers])
    out.update({c["id"]: (g.correct, g.timed_out) for c, g in zip(answers, grades, strict=True)})
    for style in ("boxed", "gsm8k"):
        responses = [c for c in cases if c["kind"] == "response" and c["style"] == style]
        grades = grade_batch([c["response"] for c in responses], [c["reference"] for c in responses], style=style)
        out.update({c["id"]: (g.correct, g.timed_out) for c, g in zip(responses, grades, strict=True)})
    return out


def test_labelled_suite_passes(suite_verdicts):
    wrong = [
        f"{c['id']} ({c['category']}): {c.get('given', c.get('response', ''))[:80]!r} vs {c['reference']!r} "
        f"expected {c['expected']}"
        for c in _cases()
        if suite_verdicts[c["id"]][0] != c["expected"]
    ]
    assert not wrong, "\n".join(wrong)
    assert not any(timed_out for _, timed_out in suite_verdicts.values())


# --- extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "style", "answer"),
    [
        ("so x } = 3 and then \\boxed{\\frac{1}{2}}.", "boxed", "\\frac{1}{2}"),
        ("\\boxed{1} then \\fbox{2}", "boxed", "2"),
        ("\\boxed{\\{1, 2\\}}", "boxed", "\\{1, 2\\}"),
        ("the answer is \\boxed 5.", "boxed", "5."),
        ("empty \\boxed{} box", "boxed", None),
        ("\\boxed{3} then a final empty \\boxed{ }", "boxed", None),
        ("no box, the answer is 5", "boxed", None),
        ("cut off \\boxed{\\frac{1}{2", "boxed", None),
        ("<think>maybe \\boxed{3}</think> so \\boxed{4}", "boxed", "4"),
        ("<think>so \\boxed{3}</think> I am sure.", "boxed", "3"),
        ("<think>unclosed \\boxed{7} and \\boxed{8}", "boxed", "8"),
        ("48/2 = 24\n#### 1,080", "gsm8k", "1,080"),
        ("The answer is $18.", "gsm8k", "18"),
        ("#### 5 but The answer is: 6", "gsm8k", "6"),
        ("The answer is 6. \\boxed{7}", "gsm8k", "7"),
        ("She has 18 eggs.", "gsm8k", None),
        ("So the answer is 2 + 4 = 6 bolts.", "gsm8k", "6"),
        ("The answer is $2 x 9 = $18.", "gsm8k", "18"),
        ("12 + 30 = 42", "last_number", "42"),
    ],
)
def test_extract_answer(response, style, answer):
    assert extract_answer(response, style) == answer


def test_extract_answer_rejects_unknown_style():
    with pytest.raises(ValueError, match="unknown style 'latex'"):
        extract_answer("x", "latex")


# --- numbers and policy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-0.75", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("6\\frac{3}{4}", 6.75),
        ("-6 3/4", -6.75),
        ("4.5e3", 4500),
        ("4\\times10^{3}", 4000),
        ("2^{10}-1", 1023),
        ("\\frac{1}{\\frac{1}{\\frac{1}{4}}}", 0.25),
    ],
)
def test_parse_number(text, value):
    parsed = parse_number(text)
    assert parsed is not None and float(parsed.value) == value


def test_parse_number_refuses_giants_and_symbols_at_once():
    start = time.perf_counter()
    assert parse_number("2^{2^{2^{2^{100}}}}") is None
    assert parse_number("10^{100000}") is None
    assert parse_number("\\sqrt{2}") is None
    assert parse_number("0.\\overline{3}").value * 3 == 1  # type: ignore[union-attr]
    assert time.perf_counter() - start < 0.1


def test_rounded_reference_accepts_only_values_that_round_to_it():
    ref = parse_number("1.6")
    assert ref is not None and ref.unit is not None
    assert numbers_match(parse_number("1.62"), ref)  # type: ignore[arg-type]
    assert not numbers_match(parse_number("1.66"), ref)  # type: ignore[arg-type]
    assert not numbers_match(Number(parse_number("0.3").value), parse_number("0.33"))  # type: ignore[union-attr,arg-type]
    assert not numbers_match(parse_number("0.33"), parse_number("\\frac{1}{3}"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "reference", "expected"),
    [
        ("-2, 1", "1,-2", True),
        ("b=0, c=-3", "(b, c) = (-3, 0)", False),
        ("b=-3, c=0", "(b, c) = (-3, 0)", True),
        ("(2,1)", "(1,2)", False),
        ("(1,2]", "(1,2)", False),
        ("\\pm 2", "-2,2", True),
        ("9 \\text{ p.m.}", "9 \\text{ a.m.}", False),
        ("0.33", "\\frac13", False),
        ("0.\\overline{3}", "\\frac{1}{3}", True),
        ("\\text{(C)}", "C", True),
        ("1011", "1011_2", True),
    ],
)
def test_cheap_policy_needs_no_sympy(given, reference, expected):
    assert match(given, reference, symbolic=False) is expected


def test_symbolic_cases_are_deferred_then_decided():
    with pytest.raises(NeedsSymbolic):
        match("(x+1)^2", "x^2+2x+1", symbolic=False)
    assert answers_match("(x+1)^2", "x^2+2x+1")
    assert answers_match("\\frac{\\sqrt{12}}{4}", "\\frac{\\sqrt3}{2}")
    assert not answers_match("3\\sqrt2", "2\\sqrt3")
    assert answers_match("(1+i)^2", "2i")


# --- deadlines ---------------------------------------------------------------------------


def test_a_slow_comparison_is_killed_at_the_deadline_and_the_pool_recovers():
    pool = GradingPool(size=1)
    try:
        pool.run([("1", "1")], timeout=30)  # start the worker outside the timed part
        start = time.perf_counter()
        verdicts = pool.run([("(x+y+z+1)^{30}", "(x+y+z+2)^{30}"), ("(x+1)^2", "x^2+2x+1")], timeout=0.5)
        elapsed = time.perf_counter() - start
        assert verdicts[0] is None  # timed out: sympy needs ~12 s for this one
        assert verdicts[1] is True  # answered by the replacement worker
        assert elapsed < 0.5 + 5  # the kill is prompt; the rest is the replacement's start-up
    finally:
        pool.close()


def test_timeout_counts_as_wrong_and_is_reported():
    grades = answers_match_batch(["(x+y+z+1)^{30}", "4"], ["(x+y+z+2)^{30}", "4"], timeout=0.5)
    assert grades[0].timed_out and not grades[0].correct
    assert grades[1].correct and not grades[1].timed_out


@pytest.mark.parametrize(
    ("given", "reference"),
    [
        ("2^{2^{2^{2^{2^{100}}}}}", "5"),
        ("10^{10^{10^{10}}}", "10^{10^{10^{10}}}+1"),
        ("\\frac{1}{" * 300 + "1" + "}" * 300, "1"),
        ("9" * 6000, "9" * 5999),
        ("}}}{{{\\frac{", "\\frac{1}{2}"),
    ],
)
def test_hostile_inputs_answer_within_the_limit(given, reference):
    start = time.perf_counter()
    answers_match(given, reference)
    assert time.perf_counter() - start < 2.0 + 3.0  # limit + a possible worker start-up


def test_batch_matches_single_calls_and_checks_lengths():
    pairs = [("\\dfrac34", "0.75"), ("1,080", "1080"), ("x^2-1", "(x-1)(x+1)"), ("7", "8")]
    batch = answers_match_batch([g for g, _ in pairs], [r for _, r in pairs])
    assert [g.correct for g in batch] == [answers_match(g, r) for g, r in pairs] == [True, True, True, False]
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        answers_match_batch(["1", "2"], ["1"])
    assert grade_response("so \\boxed{\\frac{1}{2}}", "0.5")
    assert not grade_response("the answer is 0.5", "0.5")


def test_power_towers_compare_exactly_without_building_the_number():
    assert parse_tower("4^{2^{99}}") == parse_tower("2^{2^{100}}") == (2, 2**100)
    assert parse_tower("3^{3^{3^3}}") == (3, 3**27)
    assert parse_tower("8^{2^{50}}") == (2, 3 * 2**50)
    assert parse_tower("2^{2^{2^{100}}}") is None  # its exponent is itself too large to evaluate
    assert parse_tower("2^{10}-1") is None and parse_tower("1^{5}") is None
    deep = "2^{" * 700 + "2" + "}" * 700  # refused at once: no recursion error, no quadratic work
    start = time.perf_counter()
    assert parse_tower(deep) is None and time.perf_counter() - start < 0.05
