"""Worker processes that run symbolic comparisons under a hard wall-clock limit.

Why processes: sympy can run for minutes (or allocate without end) on an exponent
tower or a huge expansion, and neither ``signal.alarm`` (main thread only) nor a thread
(cannot be stopped) bounds that. Each worker is a plain ``python -m
mathrl.grading.worker`` subprocess (no fork of a process that holds torch threads, no
re-import of the user's ``__main__``), a :class:`mathrl.workers.Worker` like the Python
sandbox's sessions. A comparison that passes its deadline gets its worker killed
(SIGKILL) and replaced; the comparison counts as a timeout (not equal). Workers cap
their own memory.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from mathrl.workers import Worker, ready


class _GradingWorker(Worker):
    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "mathrl.grading.worker", "{request_fd}", "{reply_fd}"])
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0


class GradingPool:
    """``size`` workers; :meth:`run` does many tasks (:mod:`mathrl.grading.worker`), each within
    ``timeout`` seconds.

    Returns each task's reply, or None for a task that timed out (or crashed its worker).
    Thread-safe (one batch at a time). Workers start on first use and stay up.
    """

    def __init__(self, size: int | None = None):
        self.size = max(1, size or os.cpu_count() or 1)
        self.workers: list[_GradingWorker] = []
        self.lock = threading.Lock()

    def run(self, pairs: Sequence[Sequence[Any]], timeout: float) -> list[Any]:
        results: list[Any] = [None] * len(pairs)
        if not pairs:
            return results
        with self.lock:
            while len(self.workers) < min(self.size, len(pairs)):
                self.workers.append(_GradingWorker())
            queue = deque(range(len(pairs)))
            busy = 0
            while queue or busy:
                for w in self.workers:
                    if w.ready and w.task is None and queue:
                        i = queue.popleft()
                        w.task, w.deadline = i, time.monotonic() + timeout
                        try:
                            w.send(list(pairs[i]), w.deadline)
                            busy += 1
                        except (EOFError, TimeoutError):
                            w.task = None
                            queue.appendleft(i)
                            self._replace(w)
                now = time.monotonic()
                waits = [w.deadline - now for w in self.workers if w.task is not None]
                wait = max(0.0, min(waits)) if waits else 5.0
                fds = ready([w.fileno() for w in self.workers], wait)
                for w in [w for w in self.workers if w.fileno() in fds]:
                    try:
                        messages = w.receive()
                    except (EOFError, OSError):
                        if not w.ready:
                            hint = "run `python -m mathrl.grading.worker 0 1` to see why"
                            raise RuntimeError(f"a grading worker died while starting; {hint}") from None
                        if w.task is not None:
                            busy -= 1
                        self._replace(w)
                        continue
                    for message in messages:
                        if message == "ready":
                            w.ready = True
                        elif w.task is not None:
                            results[w.task] = message
                            w.task = None
                            busy -= 1
                now = time.monotonic()
                for w in list(self.workers):
                    if w.task is not None and now > w.deadline:
                        busy -= 1
                        self._replace(w)
        return results

    def _replace(self, worker: _GradingWorker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = _GradingWorker()

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
