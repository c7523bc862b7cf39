"""Score math-answer graders on one labelled suite: mathrl, math-verify and tinker-cookbook.

What it measures, per grader, on every case of the suite (``tests/data/grading_cases.jsonl``):

- accuracy: the fraction of cases where the grade equals the label ``expected``;
- false pos: graded correct although the label is false; false neg: graded incorrect although
  the label is true (a timeout or an error on a true case is a false negative);
- timeouts: cases that ran past the per-case wall-clock limit (``--timeout``, default 2.0 s);
- errors: cases where the grader raised (graded incorrect);
- grades/s: cases / wall time of grading the whole suite, worker start-up and imports excluded;
- max case wall s: the slowest single case (peers only: mathrl's batch API reports no per-case time).

How each grader is run:

- mathrl: ``answers_match_batch`` for kind=answer cases and ``grade_batch`` per style for
  kind=response cases, one call per group, with mathrl's own worker processes and hard timeouts.
- math-verify: ``verify(parse(wrap(reference)), parse(wrap(given)))`` for kind=answer, where wrap
  adds ``$...$`` as tinker-cookbook's ``grade_answer_math_verify`` does, and
  ``verify(parse(wrap(reference)), parse(response))`` (default extraction) for kind=response.
- tinker-cookbook: ``grade_answer(given, reference)``; for kind=response the answer is taken with
  ``extract_boxed`` (no box: graded incorrect), which is what its ``MathEnv`` does for every
  dataset, GSM8K included.

The two peers run in worker processes forked from this process (one case per task, ``--workers``
of them). A case that runs past the limit gets its worker killed (SIGKILL) and replaced, and counts
as a timeout graded incorrect. Neither peer's own timeout would do: tinker-cookbook's is a thread
that cannot stop the grading, and math-verify's ``signal.alarm`` (5 s by default, whole seconds)
is longer than the limit and cannot interrupt one long C call. math-verify runs into it on exponent
towers like ``2^{2^{2^{2^{100}}}}``.

Run it (math-verify and tinker-cookbook are bench-only dependencies: ``pip install -e ".[bench]"``)::

    .venv/bin/python bench/graders.py
    .venv/bin/python bench/graders.py --timeout 2 --workers 2 --json /tmp/graders.json
    .venv/bin/python bench/graders.py --graders math-verify tinker-cookbook --show-wrong math-verify
    .venv/bin/python bench/graders.py --cases other_suite.jsonl   # same JSONL line format
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkContext, ForkProcess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mathrl.grading.peer import matched_text, wrap

MATHRL = "mathrl"
MATH_VERIFY = "math-verify"
TINKER = "tinker-cookbook"
GRADERS = (MATHRL, MATH_VERIFY, TINKER)
DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "grading_cases.jsonl"
KINDS = ("answer", "response")
STYLES = ("boxed", "gsm8k")


# ----------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    kind: str  # "answer" (text is the given answer) or "response" (text is a whole response)
    style: str  # "boxed" or "gsm8k"
    text: str
    reference: str
    expected: bool


def load_cases(path: Path) -> list[Case]:
    """Read the JSONL suite; raise ValueError naming the line on a malformed case."""
    cases: list[Case] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            cases.append(_parse_case(json.loads(line)))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: bad case: {exc}") from exc
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate case ids")
    return cases


def _parse_case(row: dict[str, Any]) -> Case:
    kind = row["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    style = row.get("style", "boxed")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(row["expected"], bool):
        raise ValueError("expected must be true or false")
    text = row["given"] if kind == "answer" else row["response"]
    return Case(
        id=str(row["id"]),
        category=str(row.get("category", "uncategorized")),
        kind=kind,
        style=style,
        text=str(text),
        reference=str(row["reference"]),
        expected=row["expected"],
    )


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """One grader's verdict on one case."""

    correct: bool
    answer: str | None = None
    timed_out: bool = False
    error: str | None = None
    seconds: float | None = None  # wall time of this case, where the grader exposes it


@dataclass
class GraderRun:
    grader: str
    outcomes: list[Outcome]
    wall_s: float
    notes: list[str] = field(default_factory=list)
    max_case_s: float | None = None  # when measured separately (mathrl)


# ----------------------------------------------------------------------------- peer graders

# Runs in the worker processes (and once in this process, to warm the imports up before forking).
PeerFn = Callable[[Case], tuple[bool, str | None]]


def grade_math_verify(case: Case) -> tuple[bool, str | None]:
    from math_verify import parse, verify

    gold = parse(wrap(case.reference))
    pred = parse(wrap(case.text) if case.kind == "answer" else case.text)
    return bool(verify(gold, pred)), matched_text(pred)


def grade_tinker(case: Case) -> tuple[bool, str | None]:
    from tinker_cookbook.recipes.math_rl.math_grading import extract_boxed, grade_answer

    if case.kind == "answer":
        given = case.text
    else:
        # Both styles: tinker-cookbook has no GSM8K answer extraction for responses. Its GSM8K
        # dataset asks for \boxed{} and grades with MathEnv.check_answer (extract_boxed +
        # grade_answer); extract_gsm8k_final_answer only reads '####' off the dataset's reference.
        try:
            given = extract_boxed(case.text)
        except ValueError:  # no box (or unmatched braces): MathEnv grades it incorrect
            return False, None
    return bool(grade_answer(given, case.reference)), given


PEERS: dict[str, PeerFn] = {MATH_VERIFY: grade_math_verify, TINKER: grade_tinker}
WARMUP_CASES = (
    Case("warmup-1", "warmup", "answer", "boxed", "\\frac{14}{26}", "\\frac{7}{13}", True),
    Case("warmup-2", "warmup", "response", "boxed", "So \\boxed{x(x+2)}.", "x^2+2x", True),
)
ERROR_CHARS = 200


def _quiet_peer_logs() -> None:
    # math-verify logs a warning per internal timeout; the table counts what matters.
    for name in ("math_verify", "tinker_cookbook", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _worker_main(grader: str, conn: Connection) -> None:
    """Worker loop: receive a Case, send (correct, answer, error); stop on None or a closed pipe."""
    grade = PEERS[grader]
    conn.send("ready")
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        try:
            correct, answer = grade(case)
            conn.send((correct, answer, None))
        except Exception as exc:
            conn.send((False, None, f"{type(exc).__name__}: {str(exc)[:ERROR_CHARS]}"))


class _Worker:
    """One forked worker process with its own pipe and at most one case in flight."""

    def __init__(self, ctx: ForkContext, grader: str) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process: ForkProcess = ctx.Process(target=_worker_main, args=(grader, child_conn), daemon=True)
        self.process.start()
        child_conn.close()
        self.task: int | None = None
        self.started = 0.0

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout) or self.conn.recv() != "ready":
            raise RuntimeError("a grading worker did not start")

    def submit(self, index: int, case: Case) -> None:
        self.task = index
        self.started = time.perf_counter()
        self.conn.send(case)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self.conn.send(None)
        self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class KillingPool:
    """Process pool with a hard per-case wall-clock limit: a worker past it is killed and replaced.

    Workers are forked from this process after it imported and warmed the grader, so they start
    warm and a replacement costs one fork (milliseconds), which is counted in the timed run.
    """

    def __init__(self, grader: str, workers: int, timeout: float) -> None:
        self.grader = grader
        self.timeout = timeout
        self.ctx = multiprocessing.get_context("fork")
        self.workers = [_Worker(self.ctx, grader) for _ in range(workers)]
        for worker in self.workers:
            worker.wait_ready(timeout=60.0)
        self.killed = 0  # ran past the limit
        self.died = 0  # exited on their own (crash, out of memory)

    def __enter__(self) -> KillingPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for worker in self.workers:
            worker.stop()

    def map(self, cases: Sequence[Case]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(cases)
        pending = deque(range(len(cases)))
        idle = list(self.workers)
        busy: list[_Worker] = []
        while pending or busy:
            while idle and pending:
                worker, index = idle.pop(), pending.popleft()
                worker.submit(index, cases[index])
                busy.append(worker)
            self._collect(busy, idle, results)
        return [outcome if outcome is not None else Outcome(False, error="lost") for outcome in results]

    def _collect(self, busy: list[_Worker], idle: list[_Worker], results: list[Outcome | None]) -> None:
        """Wait until a result arrives or the earliest deadline passes; record and recycle workers."""
        deadline = min(worker.started for worker in busy) + self.timeout
        ready = wait([worker.conn for worker in busy], timeout=max(0.0, deadline - time.perf_counter()))
        for worker in [w for w in busy if w.conn in ready]:
            busy.remove(worker)
            assert worker.task is not None
            try:
                correct, answer, error = worker.conn.recv()
            except EOFError:  # the worker died (crash, out of memory): an error, and a new worker
                results[worker.task] = Outcome(False, error="worker died", seconds=self._elapsed(worker))
                idle.append(self._replace(worker))
                self.died += 1
                continue
            results[worker.task] = Outcome(bool(correct), answer, error=error, seconds=self._elapsed(worker))
            idle.append(worker)
        now = time.perf_counter()
        for worker in [w for w in busy if now - w.started >= self.timeout]:
            busy.remove(worker)
            assert worker.task is not None
            results[worker.task] = Outcome(False, timed_out=True, seconds=now - worker.started)
            idle.append(self._replace(worker))
            self.killed += 1

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.ctx, self.grader)
        fresh.wait_ready(timeout=60.0)  # a fork of a warm process: milliseconds
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    @staticmethod
    def _elapsed(worker: _Worker) -> float:
        return time.perf_counter() - worker.started


def run_peer(grader: str, cases: Sequence[Case], timeout: float, workers: int) -> GraderRun:
    _quiet_peer_logs()
    for case in WARMUP_CASES:  # import and warm up here, so that forked workers start warm
        PEERS[grader](case)
    with KillingPool(grader, workers, timeout) as pool:
        start = time.perf_counter()
        outcomes = pool.map(cases)
        wall = time.perf_counter() - start
        killed, died = pool.killed, pool.died
    notes = [f"{grader}: {killed} workers killed at the limit and {died} that died on their own, all replaced"]
    return GraderRun(grader, outcomes, wall, notes)


# ----------------------------------------------------------------------------- mathrl


def _mathrl_groups(cases: Sequence[Case]) -> dict[tuple[str, str], list[int]]:
    """kind=answer cases in one group (answers_match_batch has no style); responses by style."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, case in enumerate(cases):
        groups[("answer", "") if case.kind == "answer" else ("response", case.style)].append(index)
    return dict(groups)


def run_mathrl(cases: Sequence[Case], timeout: float) -> GraderRun:
    from mathrl.grading import answers_match_batch, grade_batch

    def call(kind: str, style: str, texts: list[str], refs: list[str]) -> list[Any]:
        if kind == "answer":
            return list(answers_match_batch(texts, refs, timeout=timeout))
        return list(grade_batch(texts, refs, style=style, timeout=timeout))

    # Warm-up (imports, worker start-up) outside the timed calls, as for the peers.
    call("answer", "", ["\\frac{14}{26}"], ["\\frac{7}{13}"])
    for style in STYLES:
        call("response", style, ["So \\boxed{13}.\n#### 13"], ["13"])

    outcomes: list[Outcome | None] = [None] * len(cases)
    notes: list[str] = []
    wall = 0.0
    for (kind, style), indices in _mathrl_groups(cases).items():
        texts = [cases[i].text for i in indices]
        refs = [cases[i].reference for i in indices]
        start = time.perf_counter()
        try:
            grades = call(kind, style, texts, refs)
        except Exception as exc:
            grades = []
            notes.append(f"mathrl raised on the {kind}/{style or '-'} group: {type(exc).__name__}: {exc}")
        wall += time.perf_counter() - start
        if grades and len(grades) != len(indices):
            notes.append(f"mathrl returned {len(grades)} grades for {len(indices)} {kind} cases")
            grades = []
        for position, index in enumerate(indices):
            if not grades:
                outcomes[index] = Outcome(False, error="batch call failed")
                continue
            grade = grades[position]
            timed_out = bool(grade.timed_out)
            outcomes[index] = Outcome(bool(grade.correct) and not timed_out, grade.answer, timed_out=timed_out)
    notes.append("mathrl: one call per group (answers; responses per style), its own workers and timeouts")
    max_case = _mathrl_max_case_wall(cases, timeout)
    notes.append("mathrl: max case wall s = slowest single call (answers_match/grade_response) over the suite")
    return GraderRun(
        MATHRL, [o if o is not None else Outcome(False, error="lost") for o in outcomes], wall, notes, max_case
    )


def _mathrl_max_case_wall(cases: Sequence[Case], timeout: float) -> float:
    """Wall time of the slowest case graded alone through the single-pair API (the cache
    is cleared first so every case is really computed again)."""
    import mathrl.grading as grading

    grading._CACHE.clear()
    slowest = 0.0
    for case in cases:
        start = time.perf_counter()
        if case.kind == "answer":
            grading.answers_match(case.text, case.reference, timeout=timeout)
        else:
            grading.grade_response(case.text, case.reference, style=case.style, timeout=timeout)
        slowest = max(slowest, time.perf_counter() - start)
    return slowest


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    grader: str
    cases: int
    accuracy: float
    false_pos: int
    false_neg: int
    timeouts: int
    errors: int
    wall_s: float
    grades_per_s: float
    max_case_s: float | None
    per_category: dict[str, tuple[int, int]]  # category -> (right, total)
    wrong: list[str]
    timed_out: list[str]
    errored: list[str]


def score(run: GraderRun, cases: Sequence[Case]) -> Score:
    right_by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong: list[str] = []
    false_pos = false_neg = 0
    for case, outcome in zip(cases, run.outcomes, strict=True):
        tally = right_by_cat[case.category]
        tally[1] += 1
        if outcome.correct == case.expected:
            tally[0] += 1
            continue
        wrong.append(case.id)
        if outcome.correct:
            false_pos += 1
        else:
            false_neg += 1
    seconds = [o.seconds for o in run.outcomes if o.seconds is not None]
    return Score(
        grader=run.grader,
        cases=len(cases),
        accuracy=(len(cases) - len(wrong)) / len(cases),
        false_pos=false_pos,
        false_neg=false_neg,
        timeouts=sum(o.timed_out for o in run.outcomes),
        errors=sum(o.error is not None for o in run.outcomes),
        wall_s=run.wall_s,
        grades_per_s=len(cases) / run.wall_s if run.wall_s > 0 else float("inf"),
        max_case_s=run.max_case_s if run.max_case_s is not None else (max(seconds) if seconds else None),
        per_category={cat: (t[0], t[1]) for cat, t in sorted(right_by_cat.items())},
        wrong=wrong,
        timed_out=[c.id for c, o in zip(cases, run.outcomes, strict=True) if o.timed_out],
        errored=[c.id for c, o in zip(cases, run.outcomes, strict=True) if o.error is not None],
    )


# ----------------------------------------------------------------------------- output


def summary_table(scores: Sequence[Score]) -> Table:
    table = Table(title=f"Graders on {scores[0].cases} cases")
    for name in ("grader", "accuracy", "false pos", "false neg", "timeouts", "errors", "grades/s", "max case wall s"):
        table.add_column(name, justify="left" if name == "grader" else "right")
    for s in scores:
        table.add_row(
            s.grader,
            f"{s.accuracy:.3f}",
            str(s.false_pos),
            str(s.false_neg),
            str(s.timeouts),
            str(s.errors),
            f"{s.grades_per_s:.1f}",
            "n/a" if s.max_case_s is None else f"{s.max_case_s:.3f}",
        )
    return table


def category_table(scores: Sequence[Score]) -> Table:
    table = Table(title="Accuracy per category")
    table.add_column("category")
    table.add_column("cases", justify="right")
    for s in scores:
        table.add_column(s.grader, justify="right")
    for category, (_, total) in scores[0].per_category.items():
        cells = [f"{s.per_category[category][0] / total:.2f}" for s in scores]
        table.add_row(category, str(total), *cells)
    return table


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def wrong_table(run: GraderRun, cases: Sequence[Case]) -> Table:
    table = Table(title=f"{run.grader}: wrong cases")
    for name in ("id", "given / response", "reference", "expected", "got", "extracted / error"):
        table.add_column(name)
    for case, outcome in zip(cases, run.outcomes, strict=True):
        if outcome.correct == case.expected:
            continue
        got = "timeout" if outcome.timed_out else "error" if outcome.error else str(outcome.correct)
        detail = outcome.error or outcome.answer or ""
        table.add_row(
            case.id, _clip(case.text, 60), _clip(case.reference, 30), str(case.expected), got, _clip(detail, 40)
        )
    return table


def notes(runs: Sequence[GraderRun], timeout: float, workers: int) -> list[str]:
    lines = [
        f"per-case wall-clock limit {timeout:g} s for every grader; a timeout or an error is graded incorrect",
        "grades/s = cases / wall time of grading the suite; imports and worker start-up are excluded for all "
        "graders (each is warmed up on cases outside the suite before the clock starts)",
        f"peers: {workers} worker processes, one case per task, a worker past the limit is killed (SIGKILL) "
        "and replaced by a fork (its fork time is counted); max case wall s is measured per case",
    ]
    if any(run.grader == MATHRL for run in runs):
        lines.append("mathrl: picks its own worker count (one per CPU)")
    return lines + [note for run in runs for note in run.notes]


def to_json(scores: Sequence[Score], cases_path: Path, timeout: float, workers: int) -> dict[str, Any]:
    return {
        "cases_path": str(cases_path),
        "cases": scores[0].cases if scores else 0,
        "timeout_s": timeout,
        "workers": workers,
        "graders": {
            s.grader: {
                "accuracy": s.accuracy,
                "false_pos": s.false_pos,
                "false_neg": s.false_neg,
                "timeouts": s.timeouts,
                "errors": s.errors,
                "wall_s": s.wall_s,
                "grades_per_s": s.grades_per_s,
                "max_case_wall_s": s.max_case_s,
                "per_category": {c: {"right": r, "total": t} for c, (r, t) in s.per_category.items()},
                "wrong": s.wrong,
                "timed_out": s.timed_out,
                "errored": s.errored,
            }
            for s in scores
        },
    }


# ----------------------------------------------------------------------------- CLI


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="labelled suite (JSONL)")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-case wall-clock limit in seconds")
    parser.add_argument("--workers", type=int, default=_default_workers(), help="worker processes for the peers")
    parser.add_argument("--graders", nargs="+", choices=GRADERS, default=list(GRADERS), help="graders to score")
    parser.add_argument("--json", type=Path, help="write all figures and the wrong case ids here")
    parser.add_argument(
        "--show-wrong", action="append", choices=GRADERS, default=[], metavar="GRADER", help="print its wrong cases"
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.workers < 1:
        parser.error("--timeout must be > 0 and --workers >= 1")
    return args


MODULES = {  # grader -> (module, names the bench uses)
    MATHRL: ("mathrl.grading", ("grade_batch", "answers_match_batch")),
    MATH_VERIFY: ("math_verify", ("parse", "verify")),
    TINKER: ("tinker_cookbook.recipes.math_rl.math_grading", ("grade_answer", "extract_boxed")),
}


def import_problems(graders: Sequence[str]) -> list[str]:
    """Import every selected grader up front, so that a missing one fails before any grading."""
    problems = []
    for grader in graders:
        module_name, names = MODULES[grader]
        hint = "" if grader == MATHRL else ' (bench-only dependency: pip install -e ".[bench]")'
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{grader}: {exc}{hint}")
            continue
        missing = [name for name in names if not hasattr(module, name)]
        if missing:
            problems.append(f"{grader}: {module_name} has no {', '.join(missing)}")
    return problems


def run_all(graders: Sequence[str], cases: Sequence[Case], timeout: float, workers: int) -> list[GraderRun]:
    # Peers first: their workers are forked, and forking is safest before mathrl may start threads.
    runs = {g: run_peer(g, cases, timeout, workers) for g in graders if g in PEERS}
    if MATHRL in graders:
        runs[MATHRL] = run_mathrl(cases, timeout)
    return [runs[g] for g in GRADERS if g in runs]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would squeeze the tables into 80 columns
        console = Console(width=160)
    cases = load_cases(args.cases)
    if not cases:
        console.print(f"[red]no cases in {args.cases}[/red]")
        return 1
    problems = import_problems(args.graders)
    for problem in problems:
        console.print(f"[red]cannot import {problem}[/red]", highlight=False)
    if problems:
        return 1
    runs = run_all(args.graders, cases, args.timeout, args.workers)
    scores = [score(run, cases) for run in runs]
    console.print(summary_table(scores))
    console.print(category_table(scores))
    for line in notes(runs, args.timeout, args.workers):
        console.print(f"- {line}", highlight=False)
    for grader in args.show_wrong:
        for run in runs:
            if run.grader == grader:
                console.print(wrong_table(run, cases))
    if args.json:
        args.json.write_text(json.dumps(to_json(scores, args.cases, args.timeout, args.workers), indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
