"""SFT traces: chat-format JSONL rows, and small pure functions to combine and filter them.

One trace per line, the format ``mathrl distill`` writes and ``mathrl sft`` reads::

    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY}],
     "problem_id": "gsm8k/train/0", "source": "SmolLM2-135M-Instruct", "dataset": "gsm8k",
     "level": null, "subject": null, "reference": "72", "answer": "72", "sample_index": 0,
     "num_chars": 311, "num_tokens": 97}

``messages`` may start with a system message; the last one is the assistant's reply.
``source`` is who wrote the reply (the teacher's label, or the dataset name for a
dataset's own reference solutions), ``num_chars`` the reply's length in characters and
``num_tokens`` its length in the writer's tokens. A problem is ``(dataset, problem_id)``.

Only ``messages`` and ``problem_id`` are required when reading; missing optional fields
get their defaults (``num_chars`` is computed), present ones are type-checked, and a bad
row is an error naming the file, the line and the field.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mathrl.grading import extract_answer
from mathrl.types import Problem

Trace = dict[str, Any]

_ROLES = ("system", "user", "assistant")
# field -> (accepted types, default, what the error says is expected)
_OPTIONAL: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "source": ((str,), "", "a string"),
    "dataset": ((str,), "", "a string"),
    "level": ((int, type(None)), None, "an integer or null"),
    "subject": ((str, type(None)), None, "a string or null"),
    "reference": ((str,), "", "a string"),
    "answer": ((str, type(None)), "", "a string"),
    "sample_index": ((int,), 0, "an integer"),
    "num_tokens": ((int,), 0, "an integer"),
}


class TraceError(ValueError):
    """A trace row is malformed; the message names file, line and field."""


def make_trace(
    messages: Sequence[dict[str, str]],
    reply: str,
    *,
    problem_id: str,
    source: str,
    dataset: str,
    level: int | None,
    subject: str | None,
    reference: str,
    answer: str | None,
    sample_index: int,
    num_tokens: int,
) -> Trace:
    """A trace row: ``messages`` (the prompt) followed by the assistant ``reply``."""
    return {
        "messages": [*messages, {"role": "assistant", "content": reply}],
        "problem_id": problem_id,
        "source": source,
        "dataset": dataset,
        "level": level,
        "subject": subject,
        "reference": reference,
        "answer": answer or "",
        "sample_index": sample_index,
        "num_chars": len(reply),
        "num_tokens": num_tokens,
    }


def reply(trace: Trace) -> str:
    """The assistant's text (the last message)."""
    return str(trace["messages"][-1]["content"])


def problem_key(trace: Trace) -> tuple[str, str]:
    return (trace["dataset"], trace["problem_id"])


def check_trace(row: Any, where: str) -> Trace:
    """``row`` as a complete trace (defaults filled in), or a TraceError naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TraceError(f"{where}: field 'messages': expected a non-empty list of {{role, content}}, got {messages!r}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
            raise TraceError(
                f"{where}: field 'messages'[{i}]: expected {{\"role\": one of {', '.join(_ROLES)}, "
                f'"content": a string}}, got {m!r}'
            )
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        roles = [m["role"] for m in messages]
        raise TraceError(f"{where}: field 'messages': expected user turn(s) then a final assistant turn, got {roles}")
    if not isinstance(row.get("problem_id"), str) or not row["problem_id"]:
        raise TraceError(f"{where}: field 'problem_id': expected a non-empty string, got {row.get('problem_id')!r}")
    out = dict(row)
    for name, (types_, default, expected) in _OPTIONAL.items():
        value = out.setdefault(name, default)
        if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
            raise TraceError(f"{where}: field {name!r}: expected {expected}, got {value!r}")
    out["answer"] = out["answer"] or ""
    out["num_chars"] = len(messages[-1]["content"])
    return out


def read_traces(path: Path) -> list[Trace]:
    """The traces of a JSONL file, checked row by row."""
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(check_trace(row, f"{path}:{lineno}"))
    return rows


def combine(*trace_lists: Iterable[Trace]) -> list[Trace]:
    """All traces, in order: the first list's first."""
    return [t for traces in trace_lists for t in traces]


def drop_duplicates(traces: Iterable[Trace]) -> list[Trace]:
    """Without repeats of the same reply to the same problem (the first one stays)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for t in traces:
        key = (*problem_key(t), reply(t))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def per_problem(traces: Iterable[Trace], k: int) -> list[Trace]:
    """At most ``k`` traces per problem, the first ones in order (k=1 dedups by problem)."""
    if k < 1:
        raise ValueError(f"per_problem: expected k >= 1, got {k}")
    counts: dict[tuple[str, str], int] = {}
    out = []
    for t in traces:
        key = problem_key(t)
        if counts.get(key, 0) < k:
            counts[key] = counts.get(key, 0) + 1
            out.append(t)
    return out


def by_source(traces: Iterable[Trace], sources: Iterable[str]) -> list[Trace]:
    wanted = set(sources)
    return [t for t in traces if t["source"] in wanted]


def by_length(
    traces: Iterable[Trace],
    *,
    min_chars: int = 0,
    max_chars: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[Trace]:
    """Traces whose reply has ``min_chars..max_chars`` characters and at most ``max_tokens``
    tokens as ``count_tokens`` counts them (the student's tokenizer, not the teacher's)."""
    if max_tokens is not None and count_tokens is None:
        raise ValueError("by_length: max_tokens needs count_tokens")
    out = []
    for t in traces:
        n = len(reply(t))
        if n < min_chars or (max_chars is not None and n > max_chars):
            continue
        if max_tokens is not None and count_tokens is not None and count_tokens(reply(t)) > max_tokens:
            continue
        out.append(t)
    return out


def shuffled(traces: Sequence[Trace], seed: int) -> list[Trace]:
    """A copy in an order fixed by ``seed``."""
    out = list(traces)
    random.Random(seed).shuffle(out)
    return out


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
_HASHES_LINE = re.compile(r"\n?[ \t]*####[ \t]*([^\n]*?)[ \t]*$")


def reference_reply(solution: str, answer: str) -> str:
    """A dataset's reference solution as an assistant reply that ends in ``\\boxed{answer}``.

    GSM8K's calculator annotations ``<<48/2=24>>`` are removed and its final ``#### 72``
    line becomes ``\\boxed{72}`` (the format the default prompt asks for, which the gsm8k
    grading style also reads); a solution with no boxed answer gets ``\\boxed{answer}``
    appended; a solution that already boxes its answer (MATH) is kept as it is.
    """
    text = _CALCULATOR.sub("", solution).rstrip()
    m = _HASHES_LINE.search(text)
    if m is not None:
        final = m.group(1).replace(",", "") or answer
        return text[: m.start()].rstrip() + f"\n\n\\boxed{{{final}}}"
    if extract_answer(text, "boxed") is None:
        return text + f"\n\n\\boxed{{{answer}}}"
    return text


def from_problems(
    problems: Iterable[Problem],
    dataset: str,
    *,
    prompt: Callable[[Problem], Sequence[dict[str, str]]],
    count_tokens: Callable[[str], int],
) -> tuple[list[Trace], int]:
    """Traces of the problems' own reference solutions (``source`` = ``dataset``), and how
    many problems had no solution to use."""
    traces, missing = [], 0
    for p in problems:
        if not p.solution:
            missing += 1
            continue
        text = reference_reply(p.solution, p.answer)
        trace = make_trace(
            prompt(p), text, problem_id=p.id, source=dataset, dataset=dataset, level=p.level, subject=p.subject,
            reference=p.answer, answer=extract_answer(text, "boxed"), sample_index=0, num_tokens=count_tokens(text),
        )  # fmt: skip
        traces.append(trace)
    return traces, missing
