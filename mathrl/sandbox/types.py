"""The sandbox's nouns: the limits of a session and the result of one run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ErrorKind = Literal["syntax", "runtime", "timeout", "memory", "output_limit", "sandbox"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("syntax", "runtime", "timeout", "memory", "output_limit", "sandbox")


@dataclass(frozen=True)
class SandboxLimits:
    """What one session may use. Every limit applies to each :meth:`Sandbox.run` call
    (``cpu_s``, ``wall_s``, ``max_output_chars``) or to the session as a whole.

    cpu_s: CPU seconds per run; past it a run executing Python code is interrupted and its
        session kept (code stuck in one long C call, or that ignores SIGXCPU, is stopped at
        ``wall_s`` instead).
    wall_s: wall-clock seconds per run; past it the run is interrupted (session kept) and,
        if it does not stop within a second, its whole session is killed and restarted.
    memory_mb: memory the code may allocate, per process (address space over what the
        interpreter maps at start) and, with a cgroup, for the whole session.
    max_procs: processes and threads the session may have at once (cgroup, or RLIMIT_NPROC
        for a non-root user).
    max_file_mb: largest file the code may write.
    tmp_mb: size of the private, writable ``/tmp`` (the session's working directory).
    max_output_chars: stdout+stderr kept per run (head and tail, with a marker of what was cut).
    """

    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    max_procs: int = 64
    max_file_mb: int = 16
    tmp_mb: int = 32
    max_output_chars: int = 4000

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_mb", "max_procs", "max_file_mb", "tmp_mb", "max_output_chars"):
            value = getattr(self, name)
            kind = int | float if name in ("cpu_s", "wall_s") else int
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                what = "number" if name in ("cpu_s", "wall_s") else "integer"
                raise ValueError(f"SandboxLimits.{name} must be a positive {what}, got {value!r}")
        if self.max_output_chars < 100:
            raise ValueError(f"SandboxLimits.max_output_chars must be at least 100, got {self.max_output_chars}")


@dataclass(frozen=True)
class ExecResult:
    """One run of code in a session.

    output: stdout and stderr interleaved as written (a trailing expression's repr too),
        capped at ``max_output_chars`` keeping head and tail.
    error: None, or what went wrong: ``syntax`` (did not compile), ``runtime`` (raised, or
        its process died), ``timeout``, ``memory``, ``output_limit`` (flooded the output
        until the session was killed) or ``sandbox`` (the sandbox itself failed).
    state_lost: this run's session was killed and restarted; the next run starts from an
        empty namespace (the tool message should say so).
    duration_s: wall time of the call, a session (re)start included.
    """

    output: str
    error: ErrorKind | None
    state_lost: bool
    duration_s: float
