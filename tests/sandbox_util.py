"""Helpers for the sandbox tests: which backends to run, and checks that the host is unharmed."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import pytest

from mathrl.sandbox import BACKENDS, Sandbox, SandboxLimits
from mathrl.sandbox.backends import probe
from mathrl.sandbox.repl import descendants

FAST = SandboxLimits(cpu_s=1, wall_s=2, memory_mb=256, max_procs=32, max_file_mb=4, tmp_mb=8, max_output_chars=1000)
"""Small limits so that the attacks that run into them end quickly."""


@cache
def _bwrap_problem() -> str | None:
    return probe(BACKENDS["bwrap"])


def require(backend: str) -> None:
    """Fail (not skip) when bubblewrap does not work on Linux: the README setup installs it and the
    battery must run with it. Elsewhere (macOS) only the fallback is claimed."""
    if backend == "bwrap":
        if sys.platform != "linux":
            pytest.skip("bubblewrap is Linux only")
        problem = _bwrap_problem()
        if problem is not None:
            pytest.fail(f"bubblewrap does not work here: {problem} (setup: apt-get install -y bubblewrap)")


def session_processes(sb: Sandbox) -> list[int]:
    """Host pids of the session's processes (bwrap's and the interpreter); [] when it is closed."""
    launched = sb._launched
    if launched is None or launched.worker.proc.poll() is not None:
        return []
    return [launched.worker.pid, *descendants(launched.worker.pid)]


def infrastructure(sb: Sandbox) -> int:
    """How many processes a ready session has of its own: bwrap's two and Python, or Python."""
    return 3 if sb.backend.name == "bwrap" else 1


def processes_with(token: str) -> list[int]:
    """Host processes whose command line contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@contextmanager
def open_session(backend: str, limits: SandboxLimits = FAST) -> Iterator[Sandbox]:
    """A started session that is checked on the way out: after close() none of its processes
    and none of its cgroup directories are left."""
    require(backend)
    sb = Sandbox(limits, backend=backend)
    sb.start()
    group = sb._launched.cgroup if sb._launched else None
    try:
        yield sb
    finally:
        pids = session_processes(sb)
        sb.close()
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
        assert not left, f"processes left after close: {left}"
        if group is not None:
            assert not any(d.exists() for d in group.dirs.values()), "cgroup directories left after close"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class LoopbackServer:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
