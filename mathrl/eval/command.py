"""``mathrl eval``: models x benchmarks -> per-problem JSONL, summaries, an ablation table.

Output layout (``output_dir``)::

    config.json                      the resolved command
    <label>/<benchmark>.jsonl        one row per problem: every sample, answer, correct, tokens
    <label>/<benchmark>.summary.json pass@1 [95% CI], pass@k, maj@k, tokens, truncation
    ablation.md / .csv / .json       models x benchmarks

Rerunning with the same ``output_dir`` resumes: finished problems are read back, not
generated again; changed generation settings are refused (they would mix two runs).

``tools=python`` runs every sample as an episode of :mod:`mathrl.envs.math_python` (the model
may call a sandboxed Python tool; ``tool_args.KEY=VALUE`` sets its options): the table then
has the tool columns (mean turns, tool calls, errors, valid calls) and each sample keeps the
whole conversation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mathrl.data.datasets import DataError, load_problems
from mathrl.envs.math_python import MathPythonEnv, ToolOptions, tool_messages
from mathrl.eval.config import EvalConfig as EvalConfig  # re-exported
from mathrl.eval.metrics import BenchmarkSummary, summarize
from mathrl.eval.report import write_reports
from mathrl.eval.runner import EvalItem, GenSettings, evaluate, items_from_problems, to_results
from mathrl.grading import use_grader
from mathrl.models import EMBEDDED_MODEL, check_model_name, load_tokenizer
from mathrl.prompts import find_prompt_format
from mathrl.report import report_safely
from mathrl.rollout.backend import ChatBackend, LocalBackend
from mathrl.tracking import atomic_write_text, provenance

_GENERATION_KEYS = ("split", "n", "temperature", "top_p", "max_tokens", "seed", "suffix", "few_shot",
                    "system_prompt", "style", "chunk_size", "limit", "tools", "tool_args", "tool_parser",
                    "max_turns", "prompt_format")  # fmt: skip


def run_eval(cfg: EvalConfig) -> dict[str, list[BenchmarkSummary]]:
    console = Console()
    use_grader(cfg.grader)
    benchmarks = [b.strip() for b in cfg.benchmarks.split(",") if b.strip()]
    problem_sets = {bench_name(b): _problems(cfg, b) for b in benchmarks}
    if cfg.tools:
        tool_options(cfg.tool_args)  # checked before anything is written, like the data and models
    backends = model_backends(cfg)  # data and models checked before anything is written
    out_dir = Path(cfg.output_dir or f"runs/eval-{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    results: dict[str, list[BenchmarkSummary]] = {}
    for label, make_backend in backends:
        backend = make_backend()
        results[label] = []
        for bench, problems in problem_sets.items():
            summary = _run_one(cfg, backend, label, bench, problems, out_dir / label.replace("/", "__"), console)
            results[label].append(summary)
    markdown = write_reports(out_dir, results)
    report_safely(out_dir)
    console.print(markdown, markup=False, highlight=False, soft_wrap=True)  # rows whole, also when redirected
    console.print(f"\nresults: {out_dir}")
    return results


def bench_name(spec: str) -> str:
    """The name a benchmark's files and table column get: a file's stem, else the name."""
    path = Path(spec)
    return path.stem if path.suffix in (".jsonl", ".json", ".csv", ".parquet") else spec.replace("/", "__")


def _problems(cfg: EvalConfig, bench: str) -> list[Any]:
    try:
        loaded = load_problems(bench, cfg.split, data_dir=cfg.data_dir or None, limit=cfg.limit or None)
    except DataError as e:
        raise ValueError(f"benchmarks: {e}") from None
    print(f"{bench}: {loaded.describe()}")
    return loaded.problems


def _run_one(
    cfg: EvalConfig,
    backend: ChatBackend,
    label: str,
    bench: str,
    problems: list[Any],
    folder: Path,
    console: Console,
) -> BenchmarkSummary:
    _, rows = generate_and_grade(cfg, _GENERATION_KEYS, backend, label, bench, problems, folder, console, cfg.regrade)
    summary = summarize(bench, to_results(rows))
    record = {**asdict(summary), "model": label, **provenance()}
    atomic_write_text(folder / f"{bench}.summary.json", json.dumps(record, indent=2) + "\n")
    return summary


def generate_and_grade(
    cfg: Any,
    generation_keys: Sequence[str],
    backend: ChatBackend,
    label: str,
    name: str,
    problems: list[Any],
    folder: Path,
    console: Console,
    regrade: bool = False,
) -> tuple[list[EvalItem], list[dict[str, Any]]]:
    """The samples of one model on one dataset, graded, as per-problem rows in
    ``folder/<name>.jsonl`` (resumed; refused when ``generation_keys`` of ``cfg`` changed).
    What ``mathrl eval`` and ``mathrl distill`` share: ``cfg`` has their prompt and sampling fields."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**{k: getattr(cfg, k) for k in generation_keys}, "grader": cfg.grader}
    keep_settings(
        folder / f"{name}.settings.json",
        settings,
        f"output_dir={cfg.output_dir}: {label}/{name}",
        free=("grader",) if regrade else (),
    )
    style = cfg.style or ("gsm8k" if name == "gsm8k" else "boxed")
    items = items_from_problems(
        problems, suffix=cfg.suffix, few_shot=cfg.few_shot, system_prompt=cfg.system_prompt, style=style
    )
    if getattr(cfg, "tools", ""):
        options = tool_options(cfg.tool_args)
        items = [
            _tool_item(item, problem.problem + cfg.suffix, options)
            for item, problem in zip(items, problems, strict=True)
        ]
    gen = GenSettings(cfg.n, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.seed, getattr(cfg, "max_turns", 10))
    with problem_progress(f"{label} / {name}", len(items), console) as advance:
        rows = evaluate(
            backend,
            items,
            gen,
            out_path=folder / f"{name}.jsonl",
            chunk_size=cfg.chunk_size,
            grading_timeout=cfg.grading_timeout,
            on_progress=advance,
            regrade=regrade,
        )
    return items, rows


@contextmanager
def problem_progress(title: str, total: int, console: Console) -> Iterator[Callable[[int, int], None]]:
    """A bar that moves as each problem is generated, with elapsed time and an ETA; yields the
    ``on_progress(done, total)`` callback. Off when the console is not a terminal (a log file gets
    the results, not bar redraws)."""
    columns = (TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(title, total=total)
        yield lambda done, _total: progress.update(task, completed=done)


def tool_options(args: dict[str, Any]) -> ToolOptions:
    """``tool_args`` as the tool's options, with errors that name the key."""
    from dataclasses import fields

    names = [f.name for f in fields(ToolOptions)]
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"tool_args.{unknown[0]}: not a tool option; options: {', '.join(names)}")
    try:
        return ToolOptions(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tool_args: {e}".replace("env_args.", "tool_args.")) from None


def _tool_item(item: EvalItem, question: str, options: ToolOptions) -> EvalItem:
    messages = tool_messages(question, options)
    return EvalItem(
        item.id, messages, item.reference, item.style,
        make_env=lambda: MathPythonEnv(messages, item.reference, item.style, options),
    )  # fmt: skip


_ADDED_KEYS = {"prompt_format": "chat", "grader": "mathrl"}
"""Settings added after results were first recorded: what files written before them were made with."""


def keep_settings(path: Path, settings: dict[str, Any], what: str, free: Sequence[str] = ()) -> None:
    """Record the settings a results file is generated with; refuse to add to it with others
    (``free`` keys may change: regrade=true grades every row again with the new grader)."""
    if path.exists():
        before = {**_ADDED_KEYS, **json.loads(path.read_text())}
        changed = sorted(k for k in settings if before.get(k) != settings[k] and k not in free)
        if changed:
            hint = " (or regrade=true: every row graded again)" if changed == ["grader"] else ""
            raise ValueError(
                f"{what} was generated with other settings "
                f"({', '.join(f'{k}: {before.get(k)!r} -> {settings[k]!r}' for k in changed)}); "
                f"use a new output_dir{hint}"
            )
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


class ModelOptions(Protocol):
    """The keys that choose the model(s) or endpoint (``mathrl eval`` and ``mathrl distill``)."""

    @property
    def model(self) -> str: ...
    @property
    def labels(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def api_model(self) -> str: ...
    @property
    def api_key_env(self) -> str: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def prompt_format(self) -> str: ...


def model_backends(cfg: ModelOptions) -> list[tuple[str, Any]]:
    """(label, backend factory) per model; an endpoint counts as one more model."""
    names = [m.strip() for m in cfg.model.split(",") if m.strip()] if not cfg.base_url else []
    labels = [x.strip() for x in cfg.labels.split(",") if x.strip()]
    entries: list[tuple[str, Any]] = []
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    parser = getattr(cfg, "tool_parser", "auto")
    fmt = find_prompt_format(cfg.prompt_format)
    tools: str = getattr(cfg, "tools", "")  # mathrl distill has no tools
    if fmt.render is not None and tools:
        raise ValueError(f"prompt_format={fmt.name}: single-turn prompts only; tools=python needs prompt_format=chat")
    if fmt.render is not None and cfg.base_url:
        raise ValueError(
            f"prompt_format={fmt.name}: for local models only (an endpoint renders chat messages with its own "
            "template); leave base_url empty or use prompt_format=chat"
        )
    for name in names:
        check_model_name(name, "model")
        if Path(name).exists():  # a local model without a chat template is refused before anything is written
            _check_tokenizer(name, fmt.name)
        entries.append(
            (name, lambda name=name: LocalBackend.load(name, dtype, tool_parser=parser, prompt_format=fmt.name))
        )
    if cfg.base_url:
        if not cfg.api_model:
            raise ValueError("api_model: required with base_url (the model name the endpoint serves)")

        def remote() -> ChatBackend:
            import os

            from mathrl.rollout.openai_backend import OpenAIBackend

            return OpenAIBackend(
                cfg.base_url, cfg.api_model, api_key=os.environ.get(cfg.api_key_env), concurrency=cfg.concurrency,
                max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
            )  # fmt: skip

        entries.append((cfg.api_model, remote))
    if labels and len(labels) != len(entries):
        raise ValueError(f"labels: {len(labels)} labels for {len(entries)} models")
    return [(labels[i] if labels else _label(entries[i][0]), entries[i][1]) for i in range(len(entries))]


def _check_tokenizer(name: str, prompt_format: str) -> None:
    """Load a local model's tokenizer (a run's: its latest checkpoint's) to refuse early what
    :func:`load_tokenizer` would refuse later (no chat template with prompt_format=chat)."""
    from mathrl.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(name) if (Path(name) / "checkpoints.jsonl").exists() else Path(name)
    load_tokenizer(str(path), prompt_format)


def _label(name: str) -> str:
    if name == EMBEDDED_MODEL:
        return name.split(":", 1)[1]
    path = Path(name)
    if path.exists():
        return "/".join(path.resolve().parts[-2:])
    return name.replace("/", "_")
