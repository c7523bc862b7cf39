"""Pieces of the eval runner that need no model: vote keys, seeds, re-grading a row."""

from __future__ import annotations

from mathrl.eval.runner import problem_seed, regraded, vote_keys


def test_vote_keys_group_equal_answers_not_equal_strings():
    assert vote_keys(["\\frac12", "0.5", None, "2", "1/2", "\\dfrac{1}{2}"]) == [0, 0, None, 1, 0, 0]


def test_problem_seeds_are_stable_and_distinct():
    assert problem_seed(0, "gsm8k/test/1") == problem_seed(0, "gsm8k/test/1")
    assert len({problem_seed(s, f"p{i}") for s in range(3) for i in range(100)}) == 300


def test_regrade_recomputes_answers_flags_and_votes_from_the_texts():
    row = {
        "id": "p",
        "reference": "6",
        "correct": [False, False],
        "votes": [None, None],
        "samples": [
            {"text": "So the answer is 2 + 4 = 6 bolts.", "answer": "2", "correct": False, "tokens": 9},
            {"text": "The answer is 7.", "answer": None, "correct": False, "tokens": 5},
        ],
    }
    fixed = regraded(row, "gsm8k", timeout=2.0)
    assert fixed["correct"] == [True, False] and fixed["votes"] == [0, 1]
    assert [s["answer"] for s in fixed["samples"]] == ["6", "7"] and fixed["samples"][0]["tokens"] == 9
