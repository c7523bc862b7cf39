"""Benchmark statistics of mathrl.eval.metrics against values computed by hand (arithmetic in comments)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from mathrl.eval.metrics import (
    BenchmarkSummary,
    ProblemResult,
    ks_up_to,
    maj_at_k,
    maj_at_k_mean,
    pass1_ci,
    pass_at_k,
    pass_at_k_mean,
    summarize,
    wilson,
)

T, F = True, False

# ----------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_by_hand():
    # c=1, n=4, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # n=10, c=3, k=1: c/n = 0.3
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n=6, c=2, k=2: 1 - C(4,2)/C(6,2) = 1 - 6/15 = 0.6
    assert pass_at_k(6, 2, 2) == pytest.approx(0.6)


def test_pass_at_k_edges():
    # n = k: the one k-subset is all samples, so 1 if any is correct else 0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # all correct / none correct, any k
    for k in (1, 2, 3, 4):
        assert pass_at_k(4, 4, k) == 1.0
        assert pass_at_k(4, 0, k) == 0.0
    # n - c < k: every 3-subset of 4 with 2 correct has a correct one
    assert pass_at_k(4, 2, 3) == 1.0


def test_pass_at_k_matches_binomial_definition():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) ~ 2.7e299 and C(4000, 2000) overflows a float; the product form needs neither.
    exact = 1 - Fraction(math.comb(990, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    exact = 1 - Fraction(math.comb(3990, 2000), math.comb(4000, 2000))
    assert pass_at_k(4000, 10, 2000) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (3, 0, -1)])
def test_pass_at_k_invalid_k_names_k_and_n(n: int, c: int, k: int):
    with pytest.raises(ValueError, match=rf"k={k}, n={n}"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("c", [-1, 5])
def test_pass_at_k_invalid_c(c: int):
    with pytest.raises(ValueError, match=rf"c={c}, n=4"):
        pass_at_k(4, c, 2)


def test_pass_at_k_mean():
    # problem 1: n=4, c=1, k=2 -> 0.5; problem 2: n=5, c=2, k=2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    # mean = (0.5 + 0.7) / 2 = 0.6
    assert pass_at_k_mean([[T, F, F, F], [F, T, F, T, F]], 2) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_k_mean([], 1)
    with pytest.raises(ValueError, match="k=3, n=2"):  # a problem with fewer than k samples
        pass_at_k_mean([[T, F, F], [T, F]], 3)


def test_ks_up_to():
    assert ks_up_to(1) == [1]
    assert ks_up_to(2) == [1, 2]
    assert ks_up_to(3) == [1, 2]
    assert ks_up_to(8) == [1, 2, 4, 8]
    assert ks_up_to(10) == [1, 2, 4, 8]  # powers of two only: 10 itself is not added
    assert ks_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="n=0"):
        ks_up_to(0)


# ----------------------------------------------------------------------------------------------- maj@k


def test_maj_at_k_ties_score_expected_tie_break():
    # k=2: one correct key, one wrong key, 1-1 tie -> 1/2
    assert maj_at_k([(1, T), (2, F)], 2) == pytest.approx(0.5)
    # k=4: 2-2 tie between a correct and a wrong key -> 1/2
    assert maj_at_k([(1, T), (2, F), (1, T), (2, F)], 4) == pytest.approx(0.5)
    # k=3: 1-1-1 tie, one of three keys correct -> 1/3
    assert maj_at_k([(1, F), (2, T), (3, F)], 3) == pytest.approx(1 / 3)
    # k=4: the wrong key wins 3-1 even though pass@4 = 1
    assert maj_at_k([(1, F), (1, F), (1, F), (2, T)], 4) == 0.0
    # k=4: the correct key wins 3-1
    assert maj_at_k([(1, T), (2, F), (1, T), (1, T)], 4) == 1.0


def test_maj_at_k_none_votes():
    # None never wins: two no-answers and one correct answer -> the answer wins -> 1
    assert maj_at_k([(None, F), (None, F), (2, T)], 3) == 1.0
    # two no-answers, then a 1-1 tie between a correct and a wrong key -> 1/2
    assert maj_at_k([(None, F), (None, F), (1, T), (2, F)], 4) == pytest.approx(0.5)
    # all no answer -> 0
    assert maj_at_k([(None, F), (None, F)], 2) == 0.0
    assert maj_at_k([(None, F)], 1) == 0.0


def test_maj_at_k_blocks_are_averaged():
    # n=4, k=2: blocks [(1,T),(1,T)] -> 1 and [(2,F),(3,T)] -> tie 1/2; mean (1 + 0.5) / 2 = 0.75
    # (one vote over all 4 would give key 1 the win -> 1.0)
    assert maj_at_k([(1, T), (1, T), (2, F), (3, T)], 2) == pytest.approx(0.75)
    # consecutive blocks: [(1,T),(1,T)] -> 1 and [(2,F),(2,F)] -> 0; mean 0.5
    assert maj_at_k([(1, T), (1, T), (2, F), (2, F)], 2) == pytest.approx(0.5)
    # n=5, k=2: n // k = 2 blocks (1 and 0, as above); the 5th sample is left out -> 0.5, not (1+0+1)/3
    assert maj_at_k([(1, T), (1, T), (2, F), (2, F), (3, T)], 2) == pytest.approx(0.5)


def test_maj_at_k_key_correctness_by_majority_of_its_flags():
    # key 1's two samples disagree (T, F): a tie is not correct -> 0
    assert maj_at_k([(1, T), (1, F)], 2) == 0.0
    # key 1 flags (T, T, F): the majority is correct, and key 1 wins 3-1 -> 1
    assert maj_at_k([(1, T), (1, T), (1, F), (2, F)], 4) == 1.0
    # key 1 flags (F, F, T): majority wrong -> 0
    assert maj_at_k([(1, F), (1, T), (1, F), (2, T)], 4) == 0.0


def test_maj_at_1_equals_pass_at_1():
    votes = [(1, T), (2, F), (None, F), (1, T), (3, F), (1, T), (2, F)]
    # pass@1 = 3 correct / 7
    assert maj_at_k(votes, 1) == pytest.approx(3 / 7)
    assert maj_at_k(votes, 1) == pytest.approx(pass_at_k(7, 3, 1))


def test_maj_at_k_invalid_k():
    with pytest.raises(ValueError, match="k=3, n=2"):
        maj_at_k([(1, T), (2, F)], 3)
    with pytest.raises(ValueError, match="k=0, n=2"):
        maj_at_k([(1, T), (2, F)], 0)


def test_maj_at_k_mean():
    # problem 1: 1-1 tie -> 0.5; problem 2: key 5 wins 2-0 and is correct -> 1; mean 0.75
    assert maj_at_k_mean([[(1, T), (2, F)], [(5, T), (5, T)]], 2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one problem"):
        maj_at_k_mean([], 1)


# ----------------------------------------------------------------------------------------------- Wilson


def test_wilson_known_values():
    # p=0.5, n=100, z=1.959964: z^2/n = 0.0384146; center = 0.5;
    # half = z / 1.0384146 * sqrt(0.25/100 + z^2/(4*100^2)) = 1.887458 * sqrt(0.00259604) = 0.096168
    low, high = wilson(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4)
    assert high == pytest.approx(0.5962, abs=1e-4)
    # p=1, n=10: low = n / (n + z^2) = 10 / 13.841459 = 0.722467; high = 1 exactly
    low, high = wilson(1.0, 10)
    assert low == pytest.approx(10 / (10 + 1.959964**2), abs=1e-6)
    assert low == pytest.approx(0.722467, abs=1e-6)
    assert high == 1.0
    # p=0, n=10: mirror image: (0, z^2 / (n + z^2)) = (0, 0.277533)
    low, high = wilson(0.0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.277533, abs=1e-6)
    # 90% (z=1.644854), p=0.5, n=100: half = z/(1+z^2/n) * sqrt(0.0025 + z^2/40000)
    #   = 1.644854/1.0270554 * sqrt(0.0025 + 0.00006764) = 1.601523 * 0.0506719 = 0.081152
    low, high = wilson(0.5, 100, confidence=0.90)
    assert (low, high) == pytest.approx((0.418848, 0.581152), abs=1e-5)


def test_wilson_stays_in_unit_interval_with_width():
    for p in (0.0, 0.01, 0.5, 0.99, 1.0):
        for n in (1, 3.5, 10, 1000):
            low, high = wilson(p, n)
            assert 0.0 <= low <= p <= high <= 1.0
            assert high - low > 0.0


def test_wilson_invalid():
    with pytest.raises(ValueError, match="p must be in"):
        wilson(1.5, 10)
    with pytest.raises(ValueError, match="n \\(trials\\) must be > 0"):
        wilson(0.5, 0)
    with pytest.raises(ValueError, match="confidence"):
        wilson(0.5, 10, confidence=1.0)


# ----------------------------------------------------------------------------------------------- pass1_ci


def test_pass1_ci_one_sample_per_problem_is_plain_wilson():
    # n=1: N = P = 5 so N_eff is clipped to exactly 5; p = 3/5
    rows = [[T], [F], [T], [T], [F]]
    p, low, high = pass1_ci(rows)
    assert p == pytest.approx(0.6)
    assert (low, high) == wilson(0.6, 5)
    # and with 100 problems, half correct: the known (0.4038, 0.5962)
    p, low, high = pass1_ci([[T], [F]] * 50)
    assert p == 0.5
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_pass1_ci_all_correct_and_none_correct():
    # 4 problems x 3 samples, all correct: p = 1, N_eff = N = 12, low = 12 / (12 + z^2) = 0.757506
    p, low, high = pass1_ci([[T, T, T]] * 4)
    assert p == 1.0
    assert high == 1.0
    assert low < 1.0
    assert low == pytest.approx(12 / (12 + 1.959964**2), abs=1e-6)
    # none correct: (0, z^2 / (12 + z^2)) = (0, 0.242494)
    p, low, high = pass1_ci([[F, F, F]] * 4)
    assert (p, low) == (0.0, 0.0)
    assert high == pytest.approx(1.959964**2 / (12 + 1.959964**2), abs=1e-6)


def test_pass1_ci_identical_rows_narrower_than_one_sample_wilson():
    # 10 problems, each 1 of 4 correct: every per-problem mean is 0.25, SE = 0 -> N_eff = N = 40
    p, low, high = pass1_ci([[T, F, F, F]] * 10)
    assert p == 0.25
    assert (low, high) == wilson(0.25, 40)
    plain_low, plain_high = wilson(0.25, 10)  # what n = 1 with the same P would give
    assert high - low < plain_high - plain_low


def test_pass1_ci_design_effect_by_hand():
    # per-problem means 1, 0.5, 0.5, 0 (n=4, P=4, N=16): p = 0.5
    # sample variance = (0.25 + 0 + 0 + 0.25) / 3 = 1/6; SE^2 = 1/6 / 4 = 1/24
    # N_eff = 0.25 / (1/24) = 6, inside [4, 16] -> wilson(0.5, 6) = (0.1876, 0.8124)
    rows = [[T, T, T, T], [T, T, F, F], [F, T, F, T], [F, F, F, F]]
    p, low, high = pass1_ci(rows)
    assert p == 0.5
    assert (low, high) == pytest.approx(wilson(0.5, 6))
    assert (low, high) == pytest.approx((0.1876, 0.8124), abs=1e-4)


def test_pass1_ci_clips_n_eff_to_problems_and_samples():
    # lower clip: means 1, 0, 1, 0 (n=2, P=4, N=8): var = 4 * 0.25 / 3 = 1/3; SE^2 = 1/12
    # N_eff = 0.25 / (1/12) = 3 < P = 4 -> 4
    _, low, high = pass1_ci([[T, T], [F, F], [T, T], [F, F]])
    assert (low, high) == pytest.approx(wilson(0.5, 4))
    # upper clip: means 0.5, 0.5, 0.5, 0.75 (n=4, P=4, N=16): p = 0.5625
    # deviations -1/16 x3, +3/16: sum sq = (3 + 9) / 256 = 12/256; var = 4/256; SE^2 = 1/256
    # N_eff = 0.5625 * 0.4375 * 256 = 63 > N = 16 -> 16
    rows = [[T, T, F, F], [T, F, T, F], [F, F, T, T], [T, T, T, F]]
    p, low, high = pass1_ci(rows)
    assert p == pytest.approx(0.5625)
    assert (low, high) == pytest.approx(wilson(0.5625, 16))


def test_pass1_ci_ragged():
    # n = 2, 4, 2, 4 (P=4, N=12); means 1, 1/4, 0, 1/2 -> p = 1.75 / 4 = 0.4375 (the pooled 5/12 is wrong)
    # deviations 9/16, -3/16, -7/16, 1/16: sum sq = (81 + 9 + 49 + 1) / 256 = 140/256; var = 140/768 = 35/192
    # SE^2 = 35/768; p(1-p) = 7/16 * 9/16 = 63/256; N_eff = 63/256 * 768/35 = 189/35 = 5.4, inside [4, 12]
    rows = [[T, T], [F, T, F, F], [F, F], [T, F, T, F]]
    p, low, high = pass1_ci(rows)
    assert p == pytest.approx(0.4375)
    assert (low, high) == pytest.approx(wilson(0.4375, 5.4))
    assert (low, high) == pytest.approx((0.14259, 0.78437), abs=1e-5)


def test_pass1_ci_single_problem_counts_once():
    # P = 1: no between-problem variance to estimate -> N_eff = P = 1
    p, low, high = pass1_ci([[T, F, F, F]])
    assert p == 0.25
    assert (low, high) == wilson(0.25, 1)


def test_pass1_ci_invalid():
    with pytest.raises(ValueError, match="at least one problem"):
        pass1_ci([])
    with pytest.raises(ValueError, match="at least one sample"):
        pass1_ci([[T], []])


# ----------------------------------------------------------------------------------------------- summarize


def test_summarize_by_hand():
    rows = [
        ProblemResult("p1", (T, T, F, F), (1, 1, 2, None), (10, 20, 30, 40), (F, F, F, T)),
        ProblemResult("p2", (F, F, F, F), (None, None, 3, 3), (5, 5, 5, 5), (F, F, F, F)),
        ProblemResult("p3", (T, T, T, T, F), (7, 7, 7, 7, 8), (1, 1, 1, 1, 6), (F, F, F, F, F)),
    ]
    s = summarize("toy", rows)
    assert isinstance(s, BenchmarkSummary)
    assert s.benchmark == "toy"
    assert s.problems == 3
    assert s.samples_per_problem == 4  # min n: 4, 4, 5
    # pass@1 = mean(2/4, 0/4, 4/5) = 1.3 / 3 = 13/30
    assert s.pass1 == pytest.approx(13 / 30)
    # means 15/30, 0, 24/30 -> deviations 2/30, -13/30, 11/30: sum sq = 294/900; var = 147/900; SE^2 = 49/900
    # p(1-p) = 13 * 17 / 900 = 221/900 -> N_eff = 221/49 = 4.51, inside [3, 13]
    assert (s.pass1_low, s.pass1_high) == pytest.approx(wilson(13 / 30, 221 / 49))
    assert sorted(s.pass_at) == sorted(s.maj_at) == [1, 2, 4]
    # pass@2: p1 1 - C(2,2)/C(4,2) = 5/6; p2 0; p3 (n=5, c=4, n-c < 2) 1 -> (5/6 + 0 + 1) / 3 = 11/18
    # pass@4: p1 (n-c = 2 < 4) 1; p2 0; p3 1 -> 2/3
    assert s.pass_at == pytest.approx({1: 13 / 30, 2: 11 / 18, 4: 2 / 3})
    # maj@1 = pass@1 = 13/30
    # maj@2: p1 blocks [1T,1T] -> 1, [2F,None] -> key 2 -> 0: 0.5; p2 [None,None] -> 0, [3F,3F] -> 0: 0;
    #        p3 [7T,7T] -> 1 twice (5th sample left out): 1 -> (0.5 + 0 + 1) / 3 = 0.5
    # maj@4: p1 key 1 wins 2-1 -> 1; p2 key 3 wins -> 0; p3 first four, key 7 -> 1 -> 2/3
    assert s.maj_at == pytest.approx({1: 13 / 30, 2: 0.5, 4: 2 / 3})
    # over all 13 samples: tokens (100 + 20 + 10) / 13 = 10; 1 truncated; 3 no-answers
    assert s.mean_tokens == pytest.approx(10.0)
    assert s.truncation_rate == pytest.approx(1 / 13)
    assert s.no_answer_rate == pytest.approx(3 / 13)


def test_summarize_invalid():
    with pytest.raises(ValueError, match="no problem results"):
        summarize("toy", [])
    bad = ProblemResult("p1", (T, F), (1,), (3, 4), (F, F))
    with pytest.raises(ValueError, match="'p1'"):
        summarize("toy", [bad])


def test_ablation_csv_keeps_pass_at_k_maj_at_k_and_the_no_answer_rate(tmp_path):
    # ablation.csv had dropped pass@k, maj@k and the no-answer rate that ablation.json keeps.
    import csv

    from mathrl.eval.metrics import BenchmarkSummary
    from mathrl.eval.report import write_reports

    four = BenchmarkSummary("gsm8k", 10, 4, 0.5, 0.3, 0.7, {1: 0.5, 2: 0.6, 4: 0.8}, {1: 0.5, 2: 0.55, 4: 0.7},
                            31.5, 0.1, 0.25)  # fmt: skip
    one = BenchmarkSummary("gsm8k", 10, 1, 0.4, 0.2, 0.6, {1: 0.4}, {1: 0.4}, 20.0, 0.0, 0.05)
    write_reports(tmp_path, {"rl": [four], "base": [one]})
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert rows[0]["pass@4"] == "0.8000" and rows[0]["maj@2"] == "0.5500" and rows[0]["no_answer"] == "0.2500"
    assert rows[1]["pass@4"] == "" and rows[1]["pass@1"] == "0.4000" and rows[1]["no_answer"] == "0.0500"
