"""``grader=math_verify``: math-verify grades in mathrl's worker processes, with its own extraction
for boxed answers (TRL's / open-r1's configuration), under mathrl's hard deadlines; the option
reaches train, eval and distill through ``use_grader``. The real math-verify package runs here."""

from __future__ import annotations

import time

import pytest

from mathrl import grading
from mathrl.config import parse_config
from mathrl.eval.config import EvalConfig
from mathrl.grading import grade_batch, use_grader
from mathrl.train.configs import DistillConfig, TrainConfig


@pytest.fixture(autouse=True)
def _default_grader():
    yield
    use_grader("mathrl")


def test_the_two_graders_differ_where_their_policies_do():
    # TRL's configuration turns math-verify's malformed-operator repair off: \frac12 is not 1/2 there.
    responses = [r"So it is \boxed{\frac12}.", r"So it is \boxed{\frac{1}{2}}.", r"\boxed{5 \geq x}"]
    references = ["0.5", "0.5", r"x \leq 5"]
    ours = grade_batch(responses, references, grader="mathrl")
    theirs = grade_batch(responses, references, grader="math_verify")
    assert [g.correct for g in ours] == [True, True, True]
    assert [g.correct for g in theirs] == [False, True, True]
    assert [g.answer for g in theirs] == [r"\frac12", r"\frac{1}{2}", r"5 \geq x"]  # what math-verify read


def test_math_verify_extracts_boxed_answers_itself_and_uses_ours_for_other_styles():
    graded = grade_batch(
        ["no boxed answer: 7", "3 + 4 = 7.", "so #### 1,234", r"first \boxed{2}, finally \boxed{3}"],
        ["7", "7", "1234", "3"],
        style=["boxed", "last_number", "gsm8k", "boxed"],
        grader="math_verify",
    )
    # boxed="all" (TRL's setting) reads every box of the reply as one answer: "2,3", not the last box
    assert [(g.correct, g.answer) for g in graded] == [(False, None), (True, "7"), (True, "1,234"), (False, "2,3")]


def test_use_grader_switches_the_process_default_and_refuses_unknown_names():
    assert grade_batch([r"\boxed{\frac12}"], ["0.5"])[0].correct
    use_grader("math_verify")
    assert not grade_batch([r"\boxed{\frac12}"], ["0.5"])[0].correct
    with pytest.raises(ValueError, match="grader: unknown 'sympy'; expected one of mathrl, math_verify"):
        use_grader("sympy")


def test_math_verify_runs_under_the_hard_deadline():
    t0 = time.monotonic()
    tower = grade_batch([r"\boxed{9^{9^{9^{9^{9}}}}}"], ["2"], timeout=0.5, grader="math_verify")[0]
    assert tower.timed_out and not tower.correct
    assert time.monotonic() - t0 < 3.0  # killed at 0.5 s (plus a worker start), not math-verify's 5 s alarm
    assert grade_batch([r"\boxed{4}"], ["4"], grader="math_verify")[0].correct  # the pool recovered


@pytest.mark.parametrize("config", [TrainConfig, EvalConfig, DistillConfig])
def test_every_grading_command_takes_the_option_with_choices_from_the_registry(config):
    cfg = parse_config(config, ["grader=math_verify"])
    assert cfg.grader == "math_verify"
    with pytest.raises(Exception, match="grader"):
        parse_config(config, ["grader=sympy"])
    assert set(grading.GRADERS) == {"mathrl", "math_verify"}
