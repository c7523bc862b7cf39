"""The run directory's append-only logs, written so that a kill never corrupts them.

metrics.jsonl / checkpoints.jsonl: each row is one ``os.write`` of a complete line on an
O_APPEND descriptor followed by fsync, so a SIGKILL leaves whole rows only. Whole files
(config.json, rollouts, plots) are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def provenance() -> dict[str, str | None]:
    """What produced a result: mathrl's version and, in a git checkout, the commit (with
    ``-dirty`` when the tree has uncommitted changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mathrl_version: str | None = version("mathrl")
    except PackageNotFoundError:
        mathrl_version = None
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"mathrl_version": mathrl_version, "git_sha": None}
    return {"mathrl_version": mathrl_version, "git_sha": sha + ("-dirty" if dirty else "")}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is empty. A malformed line is an error naming it."""
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


def keep_rows(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` atomically with only the rows ``keep`` accepts (used on resume)."""
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if keep(r)])


class MetricsLogger:
    """metrics.jsonl sink: one row per step, ``{"step": i, ...}``."""

    def __init__(self, log_path: Path):
        self.path = log_path / "metrics.jsonl"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.path, {"step": step, **metrics})

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


class ProgressBar:
    """A rich progress bar for a training loop: step, ``summary`` of the step's metrics, the last
    value of ``test_key`` and time per step; a printed line whenever ``test_key`` is measured."""

    def __init__(
        self, name: str, total: int, start: int, enabled: bool, test_key: str, test_label: str,
        summary: Callable[[dict[str, float]], str], digits: int,
    ):  # fmt: skip
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled, self.test_key, self.test_label = enabled, test_key, test_label
        self.summary, self.digits = summary, digits
        self.test = float("nan")
        self.progress = Progress(
            TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), disable=not enabled,
        )  # fmt: skip
        self.task = self.progress.add_task("", total=total, completed=start)
        self.progress.start()

    def update(self, step: int, m: dict[str, float]) -> None:
        self.test = m.get(self.test_key, self.test)
        desc = f"{self.summary(m)} test {self.test:.3f} | {m['time/step']:.1f}s/step"
        self.progress.update(self.task, completed=step + 1, description=desc)
        if self.test_key in m:
            self.progress.console.print(f"step {step}: {self.test_label} {self.test:.{self.digits}f}")

    def close(self, final: dict[str, float]) -> None:
        self.progress.stop()
        if self.enabled:
            print(f"final {self.test_label} {final.get(self.test_key, float('nan')):.{self.digits}f}")
