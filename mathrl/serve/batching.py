"""The request queue: batches of same-kind requests, served by one model call each in a single
worker thread (weight changes run in that thread too, between two calls)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mathrl.serve.chat import _Pending
from mathrl.serve.completions import _TokenJob

T = TypeVar("T")

_Job = _Pending | _TokenJob


class Batcher:
    """Queues requests and serves them with as few model calls as possible.

    One asyncio task (:meth:`run`) takes batches off the queue; the model runs in a single worker
    thread under a lock, so the event loop stays free to accept (and queue) new requests meanwhile.
    Weight changes (:meth:`exclusive`) run in the same thread, between two calls.
    """

    def __init__(self, max_batch: int, window_s: float):
        self.max_batch = max_batch
        self.window_s = window_s
        self.model_calls = 0
        self._queue: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathrl-generate")

    async def submit(self, job: _Job) -> Any:
        """Queue one request and wait for its result."""
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the model's worker thread, alone (no model call runs meanwhile)."""

        def locked() -> T:
            with self._lock:
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    async def run(self) -> None:
        """Serve queued requests until cancelled; wait ``window_s`` after being idle to gather a burst."""
        while True:
            await self._wakeup.wait()
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while batch := self._take_batch():
                await self._serve(batch)
            self._wakeup.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take_batch(self) -> list[_Job]:
        """Remove and return the oldest live request and the queued ones that can share its call."""
        self._queue = [p for p in self._queue if not p.future.done()]  # drop requests whose client left
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Job] = []
        sequences = 0
        for job in self._queue:
            if job.key == key and (not batch or sequences + job.sequences <= self.max_batch):
                batch.append(job)
                sequences += job.sequences
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    async def _serve(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._generate, batch)
        except Exception as e:  # the model failed: every request of the call gets the error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _generate(self, batch: Sequence[_Job]) -> list[Any]:
        with self._lock:
            self.model_calls += 1
            return batch[0].generate(batch)  # type: ignore[arg-type]  # a batch has one kind (its key)
