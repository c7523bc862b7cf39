"""``mathrl distill``: a teacher answers a dataset's problems; its graded-correct replies
become SFT traces. ``mathrl traces``: combine and filter trace files.

Output layout of ``mathrl distill`` (``output_dir``)::

    config.json                       the resolved command
    <teacher>/<dataset>.jsonl         every sample, one row per problem (``mathrl eval``'s format)
    <teacher>/<dataset>.settings.json the generation settings those rows were made with
    traces.jsonl                      the correct replies as chat traces (format: mathrl.traces)
    yield.json / yield.md             per teacher, dataset, level and subject: problems, samples,
                                      correct samples, yield, problems solved, traces

Generation and grading are ``mathrl eval``'s runner (:func:`mathrl.eval.runner.evaluate`):
chunks of problems, every sample graded by ``mathrl.grading``, each problem's row appended
(one write) once its chunk is graded, samples drawn from per-problem seeds. A run killed at
any point and rerun with the same command therefore continues where it stopped and draws
what an uninterrupted run would: finished problems are read back, not generated again, and
``traces.jsonl`` and the report are derived from the rows and written whole (never appended),
so nothing is lost or duplicated. Rerunning with other generation settings is refused; a
larger ``limit`` (or other filters) adds problems to the same run.

A correct reply cut off at ``max_tokens`` is not made a trace unless ``keep_truncated``:
a reply that never ends would teach the student not to stop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mathrl import traces as tr
from mathrl.data.datasets import DataError, load_problems, parse_fields, split_list
from mathrl.eval.command import bench_name, generate_and_grade, model_backends
from mathrl.eval.runner import EvalItem
from mathrl.grading import use_grader
from mathrl.prompts import math_messages
from mathrl.report import report_safely
from mathrl.tracking import atomic_write_text, write_jsonl
from mathrl.train.configs import AnswerFrom, DistillConfig, TracesConfig
from mathrl.types import Problem

# What the samples depend on: a rerun into the same output_dir must not change these.
_GENERATION_KEYS = ("split", "fields", "answer_from", "n", "temperature", "top_p", "max_tokens", "seed", "suffix",
                    "few_shot", "system_prompt", "style", "dtype", "chunk_size", "prompt_format")  # fmt: skip


def run_distill(cfg: DistillConfig) -> Path:
    """Generate, grade, write traces and the yield report; returns the output directory."""
    use_grader(cfg.grader)
    names = [d.strip() for d in cfg.datasets.split(",") if d.strip()]
    if not names:
        raise ValueError("datasets: expected at least one dataset name or file")
    problem_sets = {
        bench_name(name): load_dataset(
            name, cfg.split, cfg.data_dir, cfg.fields, cfg.answer_from, cfg.levels, cfg.subjects, cfg.limit, "datasets"
        )
        for name in names
    }
    backends = model_backends(cfg)  # data and teachers checked before anything is written
    out_dir = Path(cfg.output_dir or f"runs/distill-{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    console = Console()
    traces: list[tr.Trace] = []
    report: list[dict[str, Any]] = []
    for label, make_backend in backends:
        backend = make_backend()
        for dataset, problems in problem_sets.items():
            folder = out_dir / label.replace("/", "__")
            items, rows = generate_and_grade(cfg, _GENERATION_KEYS, backend, label, dataset, problems, folder, console)
            kept = distilled_traces(
                problems, items, rows, source=label, dataset=dataset, keep_truncated=cfg.keep_truncated
            )
            traces += kept
            report += yield_rows(label, dataset, problems, rows, kept)
            write_jsonl(out_dir / "traces.jsonl", traces)
    if len(problem_sets) > 1:
        teachers = dict.fromkeys(r["teacher"] for r in report)
        report += [_total(t, [r for r in report if r["teacher"] == t]) for t in teachers]
    atomic_write_text(out_dir / "yield.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "yield.md", yield_markdown(report))
    report_safely(out_dir)
    console.print(yield_table(report))
    console.print(f"{len(traces)} traces: {out_dir / 'traces.jsonl'}")
    return out_dir


def load_dataset(
    name: str,
    split: str,
    data_dir: str,
    fields: str,
    answer_from: AnswerFrom,
    levels: str,
    subjects: str,
    limit: int,
    key: str,
) -> list[Problem]:
    """A dataset's problems with the command's filters; errors name the config ``key``."""
    try:
        wanted_levels = split_list(levels)
        try:
            level_ints = [int(x) for x in wanted_levels] if wanted_levels else None
        except ValueError:
            raise DataError(f"levels: expected comma-separated integers, got {levels!r}") from None
        loaded = load_problems(
            name, split, data_dir=data_dir or None, fields=parse_fields(fields), answer_from=answer_from,
            levels=level_ints, subjects=split_list(subjects), limit=limit or None,
        )  # fmt: skip
    except DataError as e:
        raise ValueError(f"{key}: {e}") from None
    if not loaded.problems:
        raise ValueError(f"{key}: {name}: no problems left after levels={levels!r}, subjects={subjects!r}")
    print(f"{name}: {loaded.describe()}")
    return loaded.problems


def distilled_traces(
    problems: Sequence[Problem],
    items: Sequence[EvalItem],
    rows: Sequence[dict[str, Any]],
    *,
    source: str,
    dataset: str,
    keep_truncated: bool = False,
) -> list[tr.Trace]:
    """The graded-correct samples of ``rows`` as traces, in problem and sample order. The
    prompt is the one the teacher saw, without few-shot examples (system message kept)."""
    out = []
    for problem, item, row in zip(problems, items, rows, strict=True):
        prompt = [m.as_dict() for m in item.messages if m.role == "system"] + [item.messages[-1].as_dict()]
        for j, s in enumerate(row["samples"]):
            if s["correct"] and (keep_truncated or s["finish_reason"] != "length"):
                trace = tr.make_trace(
                    prompt, s["text"], problem_id=problem.id, source=source, dataset=dataset, level=problem.level,
                    subject=problem.subject, reference=row["reference"], answer=s["answer"], sample_index=j,
                    num_tokens=int(s["tokens"]),
                )  # fmt: skip
                out.append(trace)
    return out


def _stats(teacher: str, dataset: str, group: str, entries: Sequence[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """One report row from (problem row, number of its traces) pairs."""
    samples = sum(len(row["samples"]) for row, _ in entries)
    correct = sum(sum(bool(c) for c in row["correct"]) for row, _ in entries)
    truncated = sum(s["finish_reason"] == "length" for row, _ in entries for s in row["samples"])
    return {
        "teacher": teacher,
        "dataset": dataset,
        "group": group,
        "problems": len(entries),
        "samples": samples,
        "correct": correct,
        "yield": correct / samples if samples else 0.0,
        "solved": sum(any(row["correct"]) for row, _ in entries),
        "traces": sum(k for _, k in entries),
        "truncated": truncated / samples if samples else 0.0,
    }


def yield_rows(
    teacher: str,
    dataset: str,
    problems: Sequence[Problem],
    rows: Sequence[dict[str, Any]],
    traces: Sequence[tr.Trace],
) -> list[dict[str, Any]]:
    """Report rows for one teacher and dataset: all problems, then each level, then each subject.
    ``yield`` is correct samples / samples; ``solved`` counts problems with >= 1 correct sample."""
    per_problem: dict[str, int] = {}
    for t in traces:
        per_problem[t["problem_id"]] = per_problem.get(t["problem_id"], 0) + 1
    entries = [(p, row, per_problem.get(p.id, 0)) for p, row in zip(problems, rows, strict=True)]
    out = [_stats(teacher, dataset, "all", [(row, k) for _, row, k in entries])]
    for level in sorted({p.level for p in problems if p.level is not None}):
        out.append(_stats(teacher, dataset, f"level {level}", [(r, k) for p, r, k in entries if p.level == level]))
    for subject in sorted({p.subject for p in problems if p.subject}):
        chosen = [(r, k) for p, r, k in entries if p.subject == subject]
        out.append(_stats(teacher, dataset, f"subject {subject}", chosen))
    return out


def _total(teacher: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The datasets' "all" rows of one teacher added up."""
    alls = [r for r in rows if r["group"] == "all"]
    total = {k: sum(r[k] for r in alls) for k in ("problems", "samples", "correct", "solved", "traces")}
    truncated = sum(r["truncated"] * r["samples"] for r in alls)
    samples = total["samples"]
    return {
        "teacher": teacher, "dataset": "all datasets", "group": "all", **total,
        "yield": total["correct"] / samples if samples else 0.0, "truncated": truncated / samples if samples else 0.0,
    }  # fmt: skip


_COLUMNS = ("teacher", "dataset", "group", "problems", "samples", "correct", "yield", "solved", "traces", "truncated")


def _cells(row: dict[str, Any], columns: Sequence[str] = _COLUMNS) -> list[str]:
    return [f"{100 * row[c]:.1f}%" if c in ("yield", "truncated") else str(row[c]) for c in columns]


def yield_markdown(report: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report]
    note = (
        "\nyield = correct samples / samples; solved = problems with at least one correct sample; "
        "traces = correct samples kept as traces; truncated = samples cut off at max_tokens.\n"
    )
    return "\n".join(lines) + "\n" + note


def yield_table(report: Sequence[dict[str, Any]]) -> Table:
    """The report for the terminal; one teacher goes in the title instead of a column."""
    teachers = list(dict.fromkeys(row["teacher"] for row in report))
    columns = _COLUMNS[1:] if len(teachers) == 1 else _COLUMNS
    table = Table(title="distillation yield" + (f" of {teachers[0]}" if len(teachers) == 1 else ""))
    for c in columns:
        table.add_column(c, justify="left" if c in ("teacher", "dataset", "group") else "right")
    for row in report:
        table.add_row(*_cells(row, columns))
    return table


# ----------------------------------------------------------------------------- mathrl traces


def run_traces(cfg: TracesConfig) -> list[tr.Trace]:
    """Build, filter and write the trace file, printing what each step removed."""
    inputs = [Path(p) for p in split_list(cfg.inputs) or []]
    datasets = split_list(cfg.from_dataset) or []
    if not inputs and not datasets:
        raise ValueError("inputs: give trace files (inputs=a.jsonl,b.jsonl) and/or from_dataset=NAME")
    count = _token_counter(cfg.tokenizer) if cfg.max_tokens or datasets else None
    parts: list[list[tr.Trace]] = []
    for path in inputs:
        try:
            parts.append(tr.read_traces(path))
        except tr.TraceError as e:
            raise ValueError(f"inputs: {e}") from None  # a user's file: one line, no traceback
        print(f"{path}: {len(parts[-1])} traces")
    for name in datasets:
        problems = load_dataset(
            name, cfg.split, cfg.data_dir, cfg.fields, cfg.answer_from, cfg.levels, cfg.subjects, cfg.limit,
            "from_dataset",
        )  # fmt: skip
        assert count is not None

        def prompt(p: Problem) -> list[dict[str, str]]:
            return [m.as_dict() for m in math_messages(p.problem, suffix=cfg.suffix, system_prompt=cfg.system_prompt)]

        made, missing = tr.from_problems(problems, bench_name(name), prompt=prompt, count_tokens=count)
        parts.append(made)
        note = f" ({missing} problems without a solution)" if missing else ""
        print(f"{name}: {len(made)} reference traces{note}")
    steps: list[tuple[str, Callable[[list[tr.Trace]], list[tr.Trace]]]] = [("exact duplicates", tr.drop_duplicates)]
    if cfg.sources:
        steps.append((f"sources={cfg.sources}", lambda t: tr.by_source(t, split_list(cfg.sources) or [])))
    if cfg.min_chars or cfg.max_chars or cfg.max_tokens:
        steps.append(
            (
                "length (" + ", ".join(f"{k}={getattr(cfg, k)}" for k in ("min_chars", "max_chars", "max_tokens")
                                       if getattr(cfg, k)) + ")",
                lambda t: tr.by_length(t, min_chars=cfg.min_chars, max_chars=cfg.max_chars or None,
                                       max_tokens=cfg.max_tokens or None, count_tokens=count),
            )
        )  # fmt: skip
    if cfg.per_problem:
        steps.append((f"per_problem={cfg.per_problem}", lambda t: tr.per_problem(t, cfg.per_problem)))
    traces = tr.combine(*parts)
    print(f"combined: {len(traces)} traces")
    for name, step in steps:
        before = len(traces)
        traces = step(traces)
        print(f"{name}: removed {before - len(traces)}, {len(traces)} left")
    if cfg.shuffle:
        traces = tr.shuffled(traces, cfg.seed)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, traces)
    print(f"wrote {len(traces)} traces of {len({tr.problem_key(t) for t in traces})} problems to {out}")
    return traces


def _token_counter(name: str) -> Callable[[str], int]:
    from mathrl.models import load_tokenizer

    tokenizer = load_tokenizer(name)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
