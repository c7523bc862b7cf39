"""The run directory's append-only logs, written so that a kill never corrupts them.

metrics.jsonl / checkpoints.jsonl: each row is one ``os.write`` of a complete line on an
O_APPEND descriptor followed by fsync, so a SIGKILL leaves whole rows only. Whole files
(config.json, rollouts, plots) are written to a temporary name and renamed into place.

Trackers (TensorBoard, Weights & Biases; :data:`TRACKERS`, each turned on by a config option)
receive each metrics.jsonl row, the same keys at the same step, from :class:`MetricsLogger`.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mathrl.config import ConfigError


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


class Tracker(Protocol):
    """An experiment tracker that receives each metrics.jsonl row as it is written."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class MetricsLogger:
    """metrics.jsonl sink: one row per step, ``{"step": i, ...}``, and the same row (keys and
    step) to each tracker. A tracker that raises is dropped with one warning line: the run and
    metrics.jsonl go on. :func:`closes_trackers` closes the trackers when the trainer returns or
    raises."""

    def __init__(self, log_path: Path, trackers: Sequence[tuple[str, Tracker]] = ()):
        self.path = log_path / "metrics.jsonl"
        self.trackers = dict(trackers)
        if self.trackers:
            _OPEN.append(self)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.path, {"step": step, **metrics})
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, metrics)
            except Exception as e:  # a tracker never stops the run
                del self.trackers[name]
                _warn(f"{name} stopped at step {step} ({type(e).__name__}: {e}); metrics.jsonl has every step")
                _quietly_close(name, tracker, failed=True)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def close(self, failed: bool = False) -> None:
        """Close every tracker (wandb: finish, marked failed when ``failed``); idempotent."""
        trackers, self.trackers = self.trackers, {}
        for name, tracker in trackers.items():
            _quietly_close(name, tracker, failed)
        if self in _OPEN:
            _OPEN.remove(self)


_OPEN: list[MetricsLogger] = []  # loggers with trackers not yet closed (see closes_trackers)
F = TypeVar("F", bound=Callable[..., Any])


def closes_trackers(trainer: F) -> F:
    """Decorate a trainer: the trackers of every MetricsLogger it opened are closed when it
    returns, or raises (then wandb marks the run failed) — also when called in-process."""

    @functools.wraps(trainer)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opened = len(_OPEN)
        failed = True
        try:
            result = trainer(*args, **kwargs)
            failed = False
            return result
        finally:
            for logger in _OPEN[opened:]:
                logger.close(failed)

    return wrapper  # type: ignore[return-value]


def _warn(text: str) -> None:
    print(f"mathrl: warning: {text}", file=sys.stderr)


def _quietly_close(name: str, tracker: Tracker, failed: bool) -> None:
    try:
        tracker.close(failed)
    except Exception as e:
        _warn(f"{name} did not close cleanly ({type(e).__name__}: {e})")


# --- trackers: a registry keyed by the config option that turns each on ----------------------


class TensorBoardTracker:
    """Scalars to a TensorBoard event file in ``directory``, one per metric key at the row's step
    (float32, as TensorBoard stores scalars: its default reader shows no float64 ones). The
    resolved config is a text summary. A resumed run writes to the same directory with
    ``purge_step`` = the step it resumes from: TensorBoard's reader then hides the events of the
    redone steps from the earlier file."""

    def __init__(self, directory: Path, start_step: int, config: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=start_step)
        text = json.dumps(config, indent=2)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_step)  # Markdown code block
        self.writer.flush()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every logged step

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run whose files live in ``<log_path>/wandb`` (``WANDB_MODE=offline``:
    only there, no network). Its id and the last step it was sent are kept in
    ``<log_path>/wandb_run.json``: a resumed run continues the same wandb run (``resume="allow"``)
    and skips the steps wandb already has (wandb keeps a run's steps increasing: the redone
    steps keep their first values there, while metrics.jsonl has the redone ones)."""

    STATE = "wandb_run.json"

    def __init__(self, log_path: Path, project: str, name: str, config: Mapping[str, Any]):
        import wandb

        self.state_path = log_path / self.STATE
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        try:
            self.run = wandb.init(
                project=project, name=name or log_path.name, id=state.get("id"), resume="allow", dir=str(log_path)
            )
        except Exception as e:
            raise ConfigError(
                f"wandb_project: wandb could not start the run ({type(e).__name__}: {e}); log in with `wandb login` "
                f"or set WANDB_MODE=offline to keep the run in {log_path / 'wandb'}"
            ) from None
        self.run.config.update(dict(config), allow_val_change=True)  # a resume may change max_steps, ...
        self.last_step: int = state.get("last_step", -1)
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"id": self.run.id, "last_step": self.last_step}) + "\n")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.last_step:  # redone after a resume: wandb has this step already
            return
        self.run.log(dict(metrics), step=step)
        self.last_step = step
        self._save()

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@dataclass(frozen=True)
class TrackerKind:
    """A tracker: the config option that turns it on, the package it needs (and the extra that
    installs it) and how to open it: ``open(cfg, log_path, start_step, config)``."""

    key: str
    package: str
    extra: str
    open: Callable[[Any, Path, int, Mapping[str, Any]], Tracker]


TRACKERS = (
    TrackerKind(
        "tensorboard_dir", "tensorboard", "tensorboard",
        lambda cfg, log_path, start, config: TensorBoardTracker(Path(cfg.tensorboard_dir), start, config),
    ),
    TrackerKind(
        "wandb_project", "wandb", "wandb",
        lambda cfg, log_path, start, config: WandbTracker(log_path, cfg.wandb_project, cfg.wandb_name, config),
    ),
)  # fmt: skip
# Options that choose where metrics go, not what a run computes: a resumed run may change them.
TRACKER_KEYS = frozenset({"wandb_name", *(kind.key for kind in TRACKERS)})


def check_trackers(cfg: Any) -> None:
    """Refuse (ConfigError, before a run creates anything) a tracker whose package is missing,
    and ``wandb_name`` without ``wandb_project``."""
    if getattr(cfg, "wandb_name", "") and not getattr(cfg, "wandb_project", ""):
        raise ConfigError("wandb_name names a wandb run: pass wandb_project=PROJECT too")
    for kind in TRACKERS:
        if getattr(cfg, kind.key, ""):
            try:
                importlib.import_module(kind.package)
            except ImportError:
                raise ConfigError(
                    f'{kind.key} needs the {kind.package} package: pip install -e ".[{kind.extra}]"'
                ) from None


def open_trackers(cfg: Any, log_path: Path, start_step: int) -> list[tuple[str, Tracker]]:
    """The trackers ``cfg`` turns on (rank 0 only), given the resolved config (config.json).
    If one fails to open, those already open are closed and the error raised."""
    kinds = [kind for kind in TRACKERS if getattr(cfg, kind.key, "")]
    if not kinds:
        return []
    config = json.loads((log_path / "config.json").read_text())
    opened: list[tuple[str, Tracker]] = []
    try:
        for kind in kinds:
            opened.append((kind.key, kind.open(cfg, log_path, start_step, config)))
    except BaseException:
        for name, tracker in opened:
            _quietly_close(name, tracker, failed=True)
        raise
    return opened


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
