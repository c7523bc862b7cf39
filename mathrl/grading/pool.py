"""Worker processes that run symbolic comparisons under a hard wall-clock limit.

Why processes: sympy can run for minutes (or allocate without end) on an exponent
tower or a huge expansion, and neither ``signal.alarm`` (main thread only) nor a thread
(cannot be stopped) bounds that. Each worker is a plain ``python -m
mathrl.grading.worker`` subprocess (no fork of a process that holds torch threads, no
re-import of the user's ``__main__``), talking length-prefixed pickles over its pipes.
A comparison that passes its deadline gets its worker killed (SIGKILL) and replaced; the
comparison counts as a timeout (not equal). Workers cap their own memory.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

_HEADER = struct.Struct("<I")


def write_message(stream, obj: object) -> None:  # type: ignore[no-untyped-def]
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_message(stream) -> object:  # type: ignore[no-untyped-def]
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mathrl.grading.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, task: int, payload: tuple[str, str], timeout: float) -> None:
        assert self.proc.stdin is not None
        write_message(self.proc.stdin, payload)
        self.task = task
        self.deadline = time.monotonic() + timeout

    def receive(self) -> object:
        assert self.proc.stdout is not None
        return read_message(self.proc.stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class GradingPool:
    """``size`` workers; :meth:`run` compares many pairs, each within ``timeout`` seconds.

    Returns True/False per pair, or None for a pair that timed out (or crashed its worker).
    Thread-safe (one batch at a time). Workers start on first use and stay up.
    """

    def __init__(self, size: int | None = None):
        self.size = max(1, size or os.cpu_count() or 1)
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def run(self, pairs: Sequence[tuple[str, str]], timeout: float) -> list[bool | None]:
        results: list[bool | None] = [None] * len(pairs)
        if not pairs:
            return results
        with self.lock:
            while len(self.workers) < min(self.size, len(pairs)):
                self.workers.append(_Worker())
            queue = deque(range(len(pairs)))
            busy = 0
            while queue or busy:
                for w in self.workers:
                    if w.ready and w.task is None and queue:
                        i = queue.popleft()
                        try:
                            w.send(i, pairs[i], timeout)
                            busy += 1
                        except OSError:
                            queue.appendleft(i)
                            self._replace(w)
                now = time.monotonic()
                waits = [w.deadline - now for w in self.workers if w.task is not None]
                wait = max(0.0, min(waits)) if waits else 5.0
                readable, _, _ = select.select(self.workers, [], [], wait)
                for w in readable:
                    try:
                        message = w.receive()
                    except (EOFError, OSError):
                        if not w.ready:
                            raise RuntimeError(
                                "a grading worker died while starting; run `python -m mathrl.grading.worker` to see why"
                            ) from None
                        if w.task is not None:
                            busy -= 1
                        self._replace(w)
                        continue
                    if message == "ready":
                        w.ready = True
                    elif w.task is not None:
                        results[w.task] = bool(message)
                        w.task = None
                        busy -= 1
                now = time.monotonic()
                for w in list(self.workers):
                    if w.task is not None and now > w.deadline:
                        busy -= 1
                        self._replace(w)
        return results

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []


_POOL: GradingPool | None = None


def shared_pool() -> GradingPool:
    """The process-wide pool (one worker per CPU), closed at exit."""
    global _POOL
    if _POOL is None:
        _POOL = GradingPool()
        atexit.register(_POOL.close)
    return _POOL
