"""``Sandbox``: one persistent Python session, run cell by cell under hard limits."""

from __future__ import annotations

import os
import resource
import secrets
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mathrl.sandbox.backends import DEFAULT_PACKAGES, Backend, Launched, SandboxError, resolve, wait_ready
from mathrl.sandbox.output import OutputCap
from mathrl.sandbox.types import ErrorKind, ExecResult, SandboxLimits
from mathrl.workers import ProtocolError, Worker, raise_open_files_limit, ready

GRACE_S = 1.0
"""Past ``wall_s`` the session gets this long to stop the cell itself before it is killed."""
START_TIMEOUT_S = 30.0
FLOOD_FACTOR = 256
"""A run that writes more than this many times ``max_output_chars`` bytes (at least 1 MiB) is killed."""
LOST = "the session was restarted: its variables and imports are gone"


class Sandbox:
    """One persistent Python session in a sandbox: ``run(code)`` executes a cell, state survives.

    ``backend``: ``auto`` (bubblewrap where it works, else the rlimit fallback), ``bwrap`` or
    ``rlimit``. ``packages``: importable besides the standard library. The session starts
    on :meth:`start` (or the first run) and is restarted after a run that had to kill it.
    Use one session per thread; run many at once with :func:`run_many`.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        backend: str = "auto",
        packages: Sequence[str] = DEFAULT_PACKAGES,
    ):
        self.limits = limits or SandboxLimits()
        self.backend: Backend = resolve(backend)
        raise_open_files_limit()
        self.packages = tuple(packages)
        self._launched: Launched | None = None
        self._ready = False
        self._cells = 0

    @property
    def isolation(self) -> str:
        """What actually isolates this session, e.g. ``bwrap+cgroup+seccomp`` or ``rlimit``."""
        return self.backend.isolation()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Launch the session process (returns at once; the first run waits until it is ready)."""
        if self._launched is None:
            self._launched = self.backend.launch(self.limits, self.packages)
            self._ready = False

    def close(self) -> None:
        """Kill the session and everything it started; remove its cgroup and files."""
        if self._launched is not None:
            self._launched.close()
            self._launched = None

    def run(self, code: str) -> ExecResult:
        """Run one cell. Never raises for what the code does; returns an :class:`ExecResult`."""
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run takes a str of code, not {type(code).__name__}")
        began = time.monotonic()
        notes = []
        launched = self._launched
        if launched is not None and launched.worker.proc.poll() is not None:
            self.close()  # died between runs
            notes.append(f"[the session had ended since the last run; {LOST}]")
        try:
            launched = self._ensure_ready()
        except SandboxError as e:
            self.close()
            return ExecResult(f"the sandbox could not start: {e}", "sandbox", bool(notes), time.monotonic() - began)
        cap = OutputCap(self.limits.max_output_chars, max(1 << 20, FLOOD_FACTOR * self.limits.max_output_chars))
        error, note = self._exchange(launched, code, cap)
        if note is not None:
            self.close()
            notes.append(note)
        text = "\n".join(notes)
        output = cap.text(reserve=len(text) + 1 if text else 0)
        if text:
            output = f"{output}\n{text}" if output else text
        return ExecResult(output, error, bool(notes), time.monotonic() - began)

    def _ensure_ready(self) -> Launched:
        self.start()
        launched = self._launched
        assert launched is not None
        if self._ready:
            return launched
        problem = wait_ready(launched, START_TIMEOUT_S)
        if problem is not None:
            raise SandboxError(problem)
        _cap_address_space(launched, self.limits.memory_mb << 20)
        if launched.cgroup is not None:
            launched.baseline_tasks = launched.cgroup.task_count()
        self._ready = True
        return launched

    def _exchange(self, launched: Launched, code: str, cap: OutputCap) -> tuple[ErrorKind | None, str | None]:
        """Send the cell, read output and the reply until the hard deadline.
        Returns (error kind, note); a note means the session must be killed."""
        limits = self.limits
        deadline = time.monotonic() + limits.wall_s + GRACE_S
        worker, out = launched.worker, launched.output_fd
        oom_before = launched.cgroup.oom_kills() if launched.cgroup is not None else 0
        self._cells += 1
        cell = f"{self._cells}-{secrets.token_hex(8)}"  # the reply must name it: a forged or stale one does not
        try:
            worker.send({"code": code, "cpu_s": limits.cpu_s, "wall_s": limits.wall_s, "cell": cell}, deadline)
        except TimeoutError:
            return "timeout", f"[the session did not take the code within {limits.wall_s:g} s; {LOST}]"
        except EOFError:
            return self._died(launched, cap, oom_before)
        reply = None
        watch = [worker.fileno(), out]
        while reply is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (
                    "timeout",
                    f"[the run passed its wall-clock limit of {limits.wall_s:g} s and was stopped; {LOST}]",
                )
            readable = ready(watch, remaining)
            if out in readable and not _pump(out, cap):
                watch.remove(out)  # every writer is gone
            if cap.flooded:
                return (
                    "output_limit",
                    f"[the run wrote more than {cap.flood_bytes} bytes of output and was stopped; {LOST}]",
                )
            if worker.fileno() in readable:
                try:
                    messages = worker.receive()
                except EOFError:
                    return self._died(launched, cap, oom_before)
                except ProtocolError:
                    return "sandbox", f"[the session broke its reply protocol; {LOST}]"
                if len(messages) > 1:
                    return "sandbox", f"[the session sent more than one reply; {LOST}]"
                reply = messages[0] if messages else None
        _pump(out, cap)  # the cell flushed and its processes are dead: what they wrote is in the pipe
        if cap.flooded:
            return (
                "output_limit",
                f"[the run wrote more than {cap.flood_bytes} bytes of output and was stopped; {LOST}]",
            )
        if not _well_formed(reply, cell) or _pending(worker):
            return "sandbox", f"[the session sent a malformed reply; {LOST}]"
        error: ErrorKind | None = reply["error"]
        if reply["threads"] > 0:
            return error, f"[the run left {reply['threads']} thread(s) running; {LOST}]"
        group = launched.cgroup
        if group is not None and launched.baseline_tasks is not None and group.task_count() > launched.baseline_tasks:
            return error, f"[the run left processes running; {LOST}]"
        return error, None

    def _died(self, launched: Launched, cap: OutputCap, oom_before: int) -> tuple[ErrorKind, str]:
        """The session process ended during a run: say how (memory, a signal, an exit status)."""
        proc = launched.worker.proc
        try:
            status = proc.wait(timeout=2.0)
        except Exception:
            status = None
        oom = launched.cgroup is not None and launched.cgroup.oom_kills() > oom_before
        launched.kill()
        _pump(launched.output_fd, cap)
        if oom:
            return "memory", f"[the session ran out of memory ({self.limits.memory_mb} MB) and was killed; {LOST}]"
        return "runtime", f"[the Python process {_describe(status)}; {LOST}]"

    def __repr__(self) -> str:
        return f"Sandbox({self.limits!r}, isolation={self.isolation!r})"


def _well_formed(reply: object, cell: str) -> bool:
    """A reply to this cell: its id, an error kind the session may report, a thread count."""
    return (
        isinstance(reply, dict)
        and reply.get("cell") == cell
        and reply.get("error") in (None, "syntax", "runtime", "timeout", "memory")
        and type(reply.get("threads")) is int
    )


def _pending(worker: Worker) -> bool:
    """Whether more was written to the reply pipe after the reply (a cell writing its own)."""
    try:
        return bool(worker.receive(max_bytes=1 << 16)) or bool(worker.decoder.buffer)
    except (EOFError, ProtocolError):
        return True


def _cap_address_space(launched: Launched, memory_bytes: int) -> None:
    """RLIMIT_AS of the session's Python process: what it maps now plus ``memory_bytes``, set
    from here (prlimit) because the session cannot see its own /proc. An absolute cap below
    what it already maps would make every allocation fail. Linux only (macOS ignores RLIMIT_AS)."""
    if not hasattr(resource, "prlimit"):
        return
    pid = launched.repl_pid()
    try:
        if pid is None:
            raise OSError("the session's process was not found")
        with open(f"/proc/{pid}/status") as status:
            mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.prlimit(pid, resource.RLIMIT_AS, (mapped + memory_bytes, mapped + memory_bytes))
    except (OSError, StopIteration, ValueError) as e:
        launched.kill()
        raise SandboxError(f"could not cap the session's memory: {e}") from None


def _pump(fd: int, cap: OutputCap) -> bool:
    """Move what the output pipe holds into ``cap``; False once the pipe is closed."""
    while not cap.flooded:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        cap.feed(data)
    return True


def _describe(status: int | None) -> str:
    """How a session process ended, from bwrap's exit status (128 + signal) or Popen's (-signal)."""
    if status is None:
        return "stopped answering"
    signum = -status if status < 0 else status - 128 if status > 128 else 0
    if signum:
        with_name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return f"was killed by signal {with_name}"
    return f"exited with status {status}"


def run_many(jobs: Sequence[tuple[Sandbox, str]], max_workers: int | None = None) -> list[ExecResult]:
    """Run each (session, code) pair at once, each session on its own thread; results in order.
    A session may appear once per call. One slow cell holds only its own thread."""
    if len({id(sb) for sb, _ in jobs}) != len(jobs):
        raise ValueError("run_many: a session appears twice (one cell at a time per session)")
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max_workers or len(jobs), thread_name_prefix="mathrl-sandbox") as pool:
        return list(pool.map(lambda job: job[0].run(job[1]), jobs))
