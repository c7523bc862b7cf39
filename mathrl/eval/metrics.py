"""Benchmark summary statistics for `mathrl eval`: pass@k, maj@k and a confidence interval for pass@1.

Every problem of a benchmark is sampled n times; each sample has a correct flag and a vote key (an int
shared by samples whose final answers are mathematically equal; None when the sample gave no answer).
Everything here is pure Python: no model, no tensors.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist, fmean, variance

Vote = tuple[int | None, bool]
"""One sample for maj@k: (vote key or None for no answer, correct flag)."""


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"),
    1 - C(n-c, k) / C(n, k), in its product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never builds
    the huge binomials (C(1000, 500) overflows a float) and is exact to rounding.
    """
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c (number correct) must satisfy 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Benchmark pass@k: the mean over problems of `pass_at_k` (each problem with its own n)."""
    if not correct:
        raise ValueError("pass_at_k_mean needs at least one problem")
    return fmean(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct)


def ks_up_to(n: int) -> list[int]:
    """The k values reported for n samples per problem: the powers of two 1, 2, 4, ... that are <= n.

    Powers of two only (n itself is not added): the same k columns then line up across runs with
    different n.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    return [1 << i for i in range(n.bit_length())]


def _block_score(block: Sequence[Vote]) -> float:
    """Expected correctness of a majority vote over one block, with a uniformly random tie-break."""
    counts: Counter[int] = Counter()
    flags: defaultdict[int, list[bool]] = defaultdict(list)
    for key, ok in block:
        if key is not None:  # no answer never gets a vote
            counts[key] += 1
            flags[key].append(bool(ok))
    if not counts:  # every sample gave no answer
        return 0.0
    top = max(counts.values())
    tied = [key for key, count in counts.items() if count == top]
    # A key is correct when most of its samples are (a strict majority; a tie counts as wrong).
    n_correct = sum(1 for key in tied if 2 * sum(flags[key]) > len(flags[key]))
    return n_correct / len(tied)


def maj_at_k(votes: Sequence[Vote], k: int) -> float:
    """Expected accuracy of a majority vote over k samples of ONE problem (maj@k, self-consistency).

    The n samples are cut into n // k disjoint consecutive blocks of k (the n mod k trailing samples,
    if any, are left out; none are when k divides n, as for powers of two k with n a power of two), and
    the score is the mean over blocks. Each block is itself k samples of the problem, so for
    exchangeable samples (drawn i.i.d. given the problem) every block's score, and hence the mean, is an
    unbiased estimate of maj@k, and every sample contributes.

    Within a block: votes are counted per key; None (no answer) never wins; a block where every sample
    is None scores 0. Among the keys with the top count the block scores (tied keys that are correct) /
    (tied keys): the expected accuracy under a uniformly random tie-break. A key is correct when the
    majority of its samples in the block are flagged correct (a tie is not correct), so that a grader
    that disagrees with itself on equal answers cannot make the key count twice. With k = 1 this is
    pass@1 (for samples without an answer flagged incorrect).
    """
    n = len(votes)
    _check_k(n, k)
    return fmean(_block_score(votes[b * k : (b + 1) * k]) for b in range(n // k))


def maj_at_k_mean(problems: Sequence[Sequence[Vote]], k: int) -> float:
    """Benchmark maj@k: the mean over problems of `maj_at_k`."""
    if not problems:
        raise ValueError("maj_at_k_mean needs at least one problem")
    return fmean(maj_at_k(votes, k) for votes in problems)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(p: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a proportion p observed over n trials (n may be fractional).

    Unlike the Wald interval p ± z*sqrt(p(1-p)/n), it stays inside [0, 1] and keeps a nonzero width at
    p = 0 and p = 1 (an observed 100% does not claim certainty).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not n > 0:
        raise ValueError(f"n (trials) must be > 0, got {n}")
    z = _z(confidence)
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    low = 0.0 if p == 0.0 else max(0.0, center - half)  # the bounds at p = 0 and 1 are exact
    high = 1.0 if p == 1.0 else min(1.0, center + half)
    return low, high


def pass1_ci(correct: Sequence[Sequence[bool]], confidence: float = 0.95) -> tuple[float, float, float]:
    """pass@1 with a confidence interval: (mean, low, high).

    pass@1 = p = the mean over the P problems of each problem's fraction correct (n_i samples each; n_i
    may differ). The interval is the Wilson score interval for p with an effective number of trials
    N_eff from Kish's design effect (Kish 1965, "Survey Sampling"):

    * the problems are the sampling unit (the benchmark is a sample of problems; the n samples of one
      problem are correlated), so the clustered standard error is SE^2 = var(per-problem means) / P
      (sample variance);
    * N_eff = p(1-p) / SE^2 is the number of independent trials that would give that SE, clipped to
      [P, N] with N = sum n_i: every problem counts at least once, and the samples cannot count more
      than if all N were independent. Where the ratio is undefined: N_eff = N when p is 0 or 1 or
      SE = 0 (the upper clip), and N_eff = P when P = 1 (one problem: no between-problem variance).

    Why: a Wald interval collapses to zero width at 0% and 100% and can leave [0, 1]; Wilson does not.
    The design effect makes n > 1 samples per problem narrow the interval only as far as they are
    independent evidence. With n = 1 (N = P) this is exactly the plain Wilson interval with P trials.
    """
    if not correct:
        raise ValueError("pass1_ci needs at least one problem")
    if any(len(row) == 0 for row in correct):
        raise ValueError("pass1_ci: every problem needs at least one sample")
    means = [sum(map(bool, row)) / len(row) for row in correct]
    n_problems = len(means)
    n_samples = sum(len(row) for row in correct)
    p = fmean(means)
    if n_problems == 1:
        n_eff = float(n_problems)
    else:
        se2 = variance(means) / n_problems
        n_eff = float(n_samples) if p in (0.0, 1.0) or se2 == 0.0 else p * (1.0 - p) / se2
        n_eff = min(max(n_eff, float(n_problems)), float(n_samples))
    low, high = wilson(p, n_eff, confidence)
    return p, low, high


@dataclass(frozen=True)
class ProblemResult:
    """The graded samples of one problem: per-sample correct flag, vote key, token count, truncation;
    for tool episodes, per sample (turns, tool calls, tool errors, of which unparseable calls)."""

    problem_id: str
    correct: tuple[bool, ...]
    votes: tuple[int | None, ...]
    tokens: tuple[int, ...]
    truncated: tuple[bool, ...]
    tool_use: tuple[tuple[int, int, int, int], ...] = ()


@dataclass
class BenchmarkSummary:
    """The headline numbers of one benchmark run; pass_at and maj_at are keyed by k."""

    benchmark: str
    problems: int
    samples_per_problem: int
    pass1: float
    pass1_low: float
    pass1_high: float
    pass_at: dict[int, float]
    maj_at: dict[int, float]
    mean_tokens: float
    truncation_rate: float
    no_answer_rate: float
    tools: dict[str, float] | None = None
    """Tool episodes: mean_turns, mean_tool_calls, mean_tool_errors (per episode) and
    valid_call_rate (calls that parsed / calls attempted)."""


def summarize(benchmark: str, rows: Sequence[ProblemResult]) -> BenchmarkSummary:
    """Summarize one benchmark: pass@1 with its 95% interval, pass@k and maj@k for k in ks_up_to(n).

    n (samples_per_problem) is the smallest sample count over problems, so every k is defined for every
    problem; each problem's estimators still use all of its own samples. mean_tokens, truncation_rate
    and no_answer_rate are taken over all samples.
    """
    if not rows:
        raise ValueError(f"summarize({benchmark!r}): no problem results")
    for r in rows:
        lengths = {len(r.correct), len(r.votes), len(r.tokens), len(r.truncated)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"problem {r.problem_id!r}: correct, votes, tokens and truncated must have one equal, "
                f"nonzero length, got {len(r.correct)}, {len(r.votes)}, {len(r.tokens)}, {len(r.truncated)}"
            )
    n = min(len(r.correct) for r in rows)
    correct = [r.correct for r in rows]
    votes = [list(zip(r.votes, r.correct, strict=True)) for r in rows]
    pass1, low, high = pass1_ci(correct)
    ks = ks_up_to(n)
    return BenchmarkSummary(
        benchmark=benchmark,
        problems=len(rows),
        samples_per_problem=n,
        pass1=pass1,
        pass1_low=low,
        pass1_high=high,
        pass_at={k: pass_at_k_mean(correct, k) for k in ks},
        maj_at={k: maj_at_k_mean(votes, k) for k in ks},
        mean_tokens=fmean(t for r in rows for t in r.tokens),
        truncation_rate=fmean(bool(t) for r in rows for t in r.truncated),
        no_answer_rate=fmean(v is None for r in rows for v in r.votes),
        tools=tool_summary([u for r in rows for u in r.tool_use]) if all(r.tool_use for r in rows) else None,
    )


def tool_summary(episodes: Sequence[tuple[int, int, int, int]]) -> dict[str, float]:
    """Means per episode of turns, tool calls and tool errors, and the share of attempted calls
    that parsed (1.0 when none was attempted)."""
    calls = sum(e[1] for e in episodes)
    attempted = calls + sum(e[3] for e in episodes)
    return {
        "mean_turns": fmean(e[0] for e in episodes),
        "mean_tool_calls": fmean(e[1] for e in episodes),
        "mean_tool_errors": fmean(e[2] for e in episodes),
        "valid_call_rate": calls / attempted if attempted else 1.0,
    }


def test_metrics(summary: BenchmarkSummary, prefix: str = "test/") -> dict[str, float]:
    """A summary as flat metrics.jsonl keys (tinker's ``test/env/all/correct`` is pass@1)."""
    out = {
        f"{prefix}env/all/correct": summary.pass1,
        f"{prefix}pass@1/ci_low": summary.pass1_low,
        f"{prefix}pass@1/ci_high": summary.pass1_high,
        f"{prefix}env/all/ac_tokens_per_turn": summary.mean_tokens,
        f"{prefix}env/all/frac_truncated": summary.truncation_rate,
        f"{prefix}env/all/frac_no_answer": summary.no_answer_rate,
    }
    out |= {f"{prefix}pass@{k}": v for k, v in summary.pass_at.items() if k > 1}
    out |= {f"{prefix}maj@{k}": v for k, v in summary.maj_at.items() if k > 1}
    if summary.tools is not None:
        names = {"mean_turns": "num_turns", "mean_tool_calls": "num_tool_calls",
                 "mean_tool_errors": "num_tool_errors", "valid_call_rate": "valid_call_rate"}  # fmt: skip
        out |= {f"{prefix}env/all/{names[k]}": v for k, v in summary.tools.items()}
    return out
