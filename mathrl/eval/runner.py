"""Evaluate a backend on a list of problems: generate (or run tool episodes), grade, record.

The same function serves ``mathrl eval`` (a local model or an OpenAI-compatible
endpoint) and the test evaluation inside ``mathrl train`` (the sampler's weights, via
:class:`LocalBackend`), so both report the same numbers the same way. Each problem's
row (every sample, its extracted answer, correct flag, token count, finish reason and
vote key) is appended to a JSONL file as soon as its chunk is graded; a rerun reads the
file and generates only the problems that are missing. Each problem's samples come from
their own random streams (seeded by the run seed and the problem id), so a resumed run,
another chunk size or a served model samples what an uninterrupted local run would.

Problems with an env (``EvalItem.make_env``: tool use) run as episodes through
:meth:`ChatBackend.run_episodes`; the env grades the final reply, and each sample keeps the
whole conversation: every turn's text, tokens and end, each tool call with its code,
output, error kind and duration.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathrl.envs.base import Env
from mathrl.eval.metrics import ProblemResult
from mathrl.grading import answers_match, grade_batch
from mathrl.grading.normalize import normalize
from mathrl.prompts import math_messages
from mathrl.rollout.backend import ChatBackend, Turn
from mathrl.tracking import append_jsonl, read_jsonl, write_jsonl
from mathrl.types import Message, Problem


@dataclass(frozen=True)
class EvalItem:
    """One problem as the model sees it, and how to grade its answer; or, for tool use, how
    to make a fresh env per sample (which has the messages and grades the episode)."""

    id: str
    messages: tuple[Message, ...]
    reference: str
    style: str = "boxed"
    make_env: Callable[[], Env] | None = None


@dataclass(frozen=True)
class GenSettings:
    n: int = 1
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_turns: int = 10


def items_from_problems(
    problems: Sequence[Problem], *, suffix: str, few_shot: int = 0, system_prompt: str = "", style: str = "boxed"
) -> list[EvalItem]:
    return [
        EvalItem(
            p.id,
            tuple(math_messages(p.problem, suffix=suffix, few_shot=few_shot, system_prompt=system_prompt or None)),
            p.answer,
            style,
        )
        for p in problems
    ]


def evaluate(
    backend: ChatBackend,
    items: Sequence[EvalItem],
    settings: GenSettings,
    *,
    out_path: Path | None = None,
    chunk_size: int = 64,
    grading_timeout: float = 2.0,
    on_progress: Callable[[int, int], None] | None = None,
    regrade: bool = False,
) -> list[dict[str, Any]]:
    """Rows for ``items`` (in their order); with ``out_path``, resume from and append to it.
    ``regrade`` grades the finished rows' texts again with the current grader (after a
    grader fix or a corrected reference) instead of trusting their stored verdicts.
    ``on_progress(done, total)``: once with the problems already done, then as each problem's
    samples are generated (mid-chunk where the backend reports it: a progress bar with an ETA)."""
    done: dict[str, dict[str, Any]] = {}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path is not None and out_path.exists():
        done = {row["id"]: row for row in read_jsonl(out_path)}
        if regrade:
            styles = {item.id: item.style for item in items}
            done = {pid: regraded(row, styles.get(pid, "boxed"), grading_timeout) for pid, row in done.items()}
            write_jsonl(out_path, list(done.values()))
    finished = sum(item.id in done for item in items)
    if on_progress is not None:
        on_progress(finished, len(items))

    def one_done(_: int) -> None:
        nonlocal finished
        finished += 1
        if on_progress is not None:
            on_progress(finished, len(items))

    for start in range(0, len(items), chunk_size):
        chunk = [item for item in items[start : start + chunk_size] if item.id not in done]
        if not chunk:
            continue
        t0 = time.time()
        if chunk[0].make_env is not None:
            per_item = _episodes(backend, chunk, settings)
            for k in range(len(chunk)):  # episodes report per chunk
                one_done(k)
        else:
            per_item = _generated(backend, chunk, settings, grading_timeout, one_done if on_progress else None)
        seconds = round((time.time() - t0) / len(chunk), 3)
        for item, samples in zip(chunk, per_item, strict=True):
            row = {
                "id": item.id,
                "prompt": [m.as_dict() for m in item.messages],  # empty for tool episodes: see the samples
                "reference": item.reference,
                "correct": [s["correct"] for s in samples],
                "votes": vote_keys([s["answer"] for s in samples]),
                "samples": samples,
                "seconds": seconds,
            }
            done[item.id] = row
            if out_path is not None:
                append_jsonl(out_path, row)
    return [done[item.id] for item in items]


def _generated(
    backend: ChatBackend,
    chunk: Sequence[EvalItem],
    settings: GenSettings,
    grading_timeout: float,
    on_done: Callable[[int], None] | None = None,
) -> list[list[dict[str, Any]]]:
    """``settings.n`` single-turn replies per item, graded in one call, as sample dicts;
    ``on_done(i)`` as item i's replies are generated."""
    samples = backend.generate(
        [item.messages for item in chunk],
        n=settings.n,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seeds=[problem_seed(settings.seed, item.id) for item in chunk],
        on_done=on_done,
    )
    flat = [(item, s) for item, outs in zip(chunk, samples, strict=True) for s in outs]
    graded = iter(
        grade_batch(
            [s.text for _, s in flat],
            [item.reference for item, _ in flat],
            style=[item.style for item, _ in flat],
            timeout=grading_timeout,
        )
    )
    return [
        [
            {
                "text": s.text,
                "answer": g.answer,
                "correct": g.correct,
                "tokens": s.num_tokens,
                "finish_reason": s.finish_reason,
                "grader_timeout": g.timed_out,
            }
            for s, g in ((s, next(graded)) for s in outs)
        ]
        for outs in samples
    ]


def _episodes(backend: ChatBackend, chunk: Sequence[EvalItem], settings: GenSettings) -> list[list[dict[str, Any]]]:
    """``settings.n`` episodes per item (sample j seeded ``problem_seed + j``), as sample dicts."""
    envs = [item.make_env() for item in chunk for _ in range(settings.n)]  # type: ignore[misc]
    seeds = [problem_seed(settings.seed, item.id) + j for item in chunk for j in range(settings.n)]
    episodes = backend.run_episodes(
        envs, max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seeds=seeds,
        max_turns=settings.max_turns,
    )  # fmt: skip
    samples = [episode_sample(turns) for turns in episodes]
    return [samples[i * settings.n : (i + 1) * settings.n] for i in range(len(chunk))]


def episode_sample(turns: Sequence[Turn]) -> dict[str, Any]:
    """One episode as an eval sample: the final reply's grade, totals, and every turn."""
    final = turns[-1]

    def total(key: str) -> int:
        return int(sum(t.metrics.get(key, 0.0) for t in turns))

    return {
        "text": final.text,
        "answer": final.logs.get("answer"),
        "correct": bool(final.metrics.get("correct", 0.0)),
        "tokens": sum(t.num_tokens for t in turns),
        "finish_reason": final.finish_reason,
        "grader_timeout": bool(final.metrics.get("grader_timeout", 0.0)),
        "reward": round(sum(t.reward for t in turns), 6),
        "num_turns": len(turns),
        "num_tool_calls": total("num_tool_calls"),
        "num_tool_errors": total("num_tool_errors"),
        "num_parse_errors": total("num_tool_errors/parse"),
        "turns": [{"text": t.text, "tokens": t.num_tokens, "finish_reason": t.finish_reason, **t.logs} for t in turns],
    }


def regraded(row: dict[str, Any], style: str, timeout: float) -> dict[str, Any]:
    """``row`` with answers, correct flags and vote keys recomputed from its sample texts."""
    texts = [sample["text"] for sample in row["samples"]]
    grades = grade_batch(texts, [row["reference"]] * len(texts), style=style, timeout=timeout)
    samples = [
        {**sample, "answer": g.answer, "correct": g.correct, "grader_timeout": g.timed_out}
        for sample, g in zip(row["samples"], grades, strict=True)
    ]
    return {
        **row,
        "samples": samples,
        "correct": [g.correct for g in grades],
        "votes": vote_keys([g.answer for g in grades]),
    }


def problem_seed(seed: int, problem_id: str) -> int:
    """A stable seed per (run seed, problem): sample j of the problem uses this + j."""
    return zlib.crc32(f"{seed}:{problem_id}".encode()) * 1_000_003 % 2**62


def vote_keys(answers: Sequence[str | None]) -> list[int | None]:
    """A key per answer, equal for mathematically equal answers (for maj@k); None for no
    answer. Equal canonical spellings share a key at once; the remaining distinct
    answers are compared with the grader."""
    keys: list[int | None] = []
    representatives: list[str] = []
    by_spelling: dict[str, int] = {}
    for answer in answers:
        if answer is None:
            keys.append(None)
            continue
        spelling = normalize(answer)
        if spelling not in by_spelling:
            match = next((k for k, rep in enumerate(representatives) if answers_match(answer, rep)), None)
            if match is None:
                representatives.append(answer)
                match = len(representatives) - 1
            by_spelling[spelling] = match
        keys.append(by_spelling[spelling])
    return keys


def to_results(rows: Sequence[dict[str, Any]]) -> list[ProblemResult]:
    return [
        ProblemResult(
            problem_id=row["id"],
            correct=tuple(bool(c) for c in row["correct"]),
            votes=tuple(row["votes"]),
            tokens=tuple(int(s["tokens"]) for s in row["samples"]),
            truncated=tuple(s["finish_reason"] == "length" for s in row["samples"]),
            tool_use=tuple(
                (s["num_turns"], s["num_tool_calls"], s["num_tool_errors"], s["num_parse_errors"])
                for s in row["samples"]
            )
            if row["samples"] and "num_turns" in row["samples"][0]
            else (),
        )
        for row in rows
    ]
