"""Grading throughput on typical answers: mathrl's batch form vs the peers, same pairs.

"Typical" = what a trainer or evaluator grades: model responses ending in a boxed final
answer, against the real references of MATH-500, GSM8K (first 500 test rows), AIME
2024/2025 and AMC 2023. For every reference the suite holds three responses: the
reference itself, the reference in another typography (``\\dfrac``, spaces, ``$...$``),
and a wrong answer (another problem's reference). mathrl grades them in one
``grade_batch`` call (its workers started beforehand); the peers grade them one by one in
this process, as their APIs do, without timeouts (so a hang would show as a hang).

Two more figures for mathrl alone, the part that runs in killable worker processes
(:mod:`mathrl.workers`): symbolic pairs/s (pairs only sympy can decide, all in the
workers) and the deadline (a comparison that takes ~12 s, given 0.5 s: the wall time
until the call returns, and whether the next comparison is right). ``--baseline DIR``
times those and the typical pairs for another checkout of mathrl too (e.g. ``git
worktree add /tmp/base HEAD~1``), alternating with this one, each in a fresh process.

Run: ``.venv/bin/python bench/grading_throughput.py`` (peers need ``pip install -e ".[bench]"``
and ``pip install --no-deps tinker-cookbook==0.6.1``; ``--peers none`` skips them).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FILES = {"math500_test": None, "gsm8k_test": 500, "aime2024": None, "aime2025": None, "amc2023": None}


def typical_pairs(data: Path, seed: int = 0) -> tuple[list[str], list[str], list[bool]]:
    """(responses, references, expected) built from the real references in ``data``."""
    references: list[str] = []
    for stem, limit in FILES.items():
        rows = [json.loads(line) for line in (data / f"{stem}.jsonl").read_text().splitlines() if line.strip()]
        references += [r["answer"] for r in rows[:limit] if r["answer"]]
    rng = random.Random(seed)
    responses, refs, expected = [], [], []
    for ref in references:
        other = rng.choice(references)
        retyped = ref.replace("\\frac", "\\dfrac").replace(",", ", ")
        for answer, same in ((ref, True), (retyped, True), (other, other == ref)):
            responses.append(f"Let me compute step by step... so the final answer is $\\boxed{{{answer}}}$.")
            refs.append(ref)
            expected.append(same)
    return responses, refs, expected


def time_mathrl(responses: list[str], refs: list[str]) -> tuple[float, list[bool], int]:
    import mathrl.grading as grading

    grading.grade_batch(["\\boxed{x^2}"], ["x\\cdot x"])  # start the workers outside the clock
    grading._CACHE.clear()
    start = time.perf_counter()
    grades = grading.grade_batch(responses, refs)
    return time.perf_counter() - start, [g.correct for g in grades], sum(g.timed_out for g in grades)


def symbolic_pairs(n: int = 300) -> tuple[list[str], list[str], list[bool]]:
    """Pairs that only the symbolic comparison decides (distinct, so nothing is cached)."""
    givens, refs, expected = [], [], []
    for k in range(1, n + 1):
        same = k % 3 != 0
        givens.append(f"{k}x^2+{2 * k}x+{k if same else k + 1}")
        refs.append(f"{k}(x+1)^2")
        expected.append(same)
    return givens, refs, expected


def measure_mathrl(data: Path) -> dict[str, float]:
    """mathrl's figures, in this process (fresh: workers started outside the clocks)."""
    import mathrl.grading as grading

    responses, refs, expected = typical_pairs(data)
    typical, verdicts, timeouts = time_mathrl(responses, refs)
    givens, srefs, sexpected = symbolic_pairs()
    start = time.perf_counter()
    grades = grading.answers_match_batch(givens, srefs)
    symbolic = time.perf_counter() - start
    start = time.perf_counter()
    slow = grading.answers_match_batch(["(x+y+z+1)^{30}"], ["(x+y+z+2)^{30}"], timeout=0.5)[0]
    deadline = time.perf_counter() - start
    after = grading.answers_match_batch(["(x+1)^2"], ["x^2+2x+1"])[0]
    return {
        "typical_pairs_s": len(responses) / typical,
        "typical_errors": sum(v != e for v, e in zip(verdicts, expected, strict=True)) + timeouts,
        "symbolic_pairs_s": len(givens) / symbolic,
        "symbolic_errors": sum(g.correct != e for g, e in zip(grades, sexpected, strict=True)),
        "deadline_s": deadline,
        "deadline_ok": float(slow.timed_out and after.correct),
    }


def compare_with_baseline(baseline: Path, data: Path, rounds: int = 3) -> None:
    """This checkout vs ``baseline``, each measured ``rounds`` times in fresh processes, alternating."""
    import os
    import statistics
    import subprocess
    import sys

    here = Path(__file__).resolve().parent.parent
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "this checkout": []}
    for _ in range(rounds):
        for name, tree in (("baseline", baseline.resolve()), ("this checkout", here)):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--measure-mathrl", "--data", str(data.resolve())],
                env=env, capture_output=True, text=True, check=True, cwd=tree,
            )  # fmt: skip
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"mathrl grading: this checkout vs {baseline} (medians of {rounds} fresh processes each)")
    for column in ("tree", "typical pairs/s", "symbolic pairs/s", "deadline 0.5 s: returned after", "errors"):
        table.add_column(column, justify="left" if column == "tree" else "right")
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        errors = sum(r["typical_errors"] + r["symbolic_errors"] + (1 - r["deadline_ok"]) for r in runs)
        table.add_row(
            name,
            f"{med['typical_pairs_s']:.0f}",
            f"{med['symbolic_pairs_s']:.0f}",
            f"{med['deadline_s']:.2f} s",
            str(int(errors)),
        )
    Console().print(table)


def _math_verify() -> Callable[[str, str], bool]:
    from math_verify import parse, verify

    return lambda response, ref: bool(verify(parse(f"${ref}$"), parse(response)))


def _tinker() -> Callable[[str, str], bool]:
    from tinker_cookbook.recipes.math_rl.math_grading import extract_boxed, grade_answer

    def grade(response: str, ref: str) -> bool:
        try:
            return bool(grade_answer(extract_boxed(response), ref))
        except ValueError:
            return False

    return grade


def time_peer(grade: Callable[[str, str], bool], responses: list[str], refs: list[str]) -> tuple[float, list[bool]]:
    grade(responses[0], refs[0])
    start = time.perf_counter()
    out = [grade(r, ref) for r, ref in zip(responses, refs, strict=True)]
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--peers", choices=["all", "none"], default="all")
    parser.add_argument("--baseline", type=Path, help="another mathrl checkout to time in the same run")
    parser.add_argument("--measure-mathrl", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_mathrl:
        print(json.dumps(measure_mathrl(args.data)))
        return
    if args.baseline is not None:
        compare_with_baseline(args.baseline, args.data)
        return
    responses, refs, expected = typical_pairs(args.data)
    rows = []
    wall, verdicts, timeouts = time_mathrl(responses, refs)
    rows.append(("mathrl", wall, verdicts, timeouts))
    if args.peers == "all":
        for name, make in (("math-verify", _math_verify), ("tinker-cookbook", _tinker)):
            wall, verdicts = time_peer(make(), responses, refs)
            rows.append((name, wall, verdicts, 0))
    table = Table(title=f"Grading {len(responses)} typical responses (real references)")
    for column in ("grader", "pairs/s", "wall s", "accuracy", "false pos", "false neg", "timeouts"):
        table.add_column(column, justify="left" if column == "grader" else "right")
    for name, wall, verdicts, timeouts in rows:
        fp = sum(v and not e for v, e in zip(verdicts, expected, strict=True))
        fn = sum(e and not v for v, e in zip(verdicts, expected, strict=True))
        table.add_row(
            name,
            f"{len(responses) / wall:.0f}",
            f"{wall:.2f}",
            f"{1 - (fp + fn) / len(expected):.3f}",
            str(fp),
            str(fn),
            str(timeouts),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
