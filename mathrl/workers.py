"""Child processes that answer requests under a hard wall-clock deadline.

One mechanism for every job that must be stoppable from outside: the grader's symbolic
comparisons (:mod:`mathrl.grading.pool`) and the Python sandbox's sessions
(:mod:`mathrl.sandbox`). A :class:`Worker` is a subprocess that talks over two pipes of
its own, requests in and replies out (its stdin, stdout and stderr stay free for other
uses), in length-prefixed JSON. Never pickle: a sandboxed worker is untrusted, and
unpickling its bytes would run its code in this process. Neither side can make the
parent block past a deadline: replies are read without blocking and parsed as they
complete (a reply above ``reply_limit`` bytes is a protocol error, so a worker cannot make
the parent buffer without end), requests are written as the pipe accepts them. A worker
that misses its deadline is killed with SIGKILL, and what that means (a timeout, a lost
session) is the caller's business.

Every worker is started from one long-lived thread (:func:`spawn`): Linux ties a child's
"die with my parent" signal (``PR_SET_PDEATHSIG``, which bubblewrap's ``--die-with-parent``
sets) to the *thread* that forked it, so a child started from a short-lived pool thread
would be killed as soon as that thread ends.

This module uses the standard library only: the sandbox mounts it into its sessions,
whose side of the protocol is :func:`read_message` / :func:`write_message`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_HEADER = struct.Struct("<I")
MAX_REPLY_BYTES = 1 << 22
"""Largest reply a parent accepts (4 MiB): sandbox replies are a few hundred bytes."""


class ProtocolError(RuntimeError):
    """The worker sent something that is not a well-formed message."""


def encode(obj: object) -> bytes:
    """One message: a 4-byte little-endian length, then the JSON text (ASCII, so any str survives)."""
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return _HEADER.pack(len(data)) + data


class Decoder:
    """Incremental parser of :func:`encode`'d messages, fed whatever bytes have arrived."""

    def __init__(self, limit: int = MAX_REPLY_BYTES):
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if size > self.limit:
                raise ProtocolError(f"a {size}-byte message (the limit is {self.limit})")
            end = _HEADER.size + size
            if len(self.buffer) < end:
                break
            try:
                messages.append(json.loads(self.buffer[_HEADER.size : end]))
            except ValueError as e:
                raise ProtocolError(f"a message that is not JSON: {e}") from None
            del self.buffer[:end]
        return messages


def read_message(fd: int) -> Any:
    """The worker's side: block until one whole message arrives on ``fd``; EOFError at end of input."""
    header = _read_exactly(fd, _HEADER.size)
    (size,) = _HEADER.unpack(header)
    return json.loads(_read_exactly(fd, size))


def write_message(fd: int, obj: object) -> None:
    """The worker's side: write one whole message to ``fd``."""
    data = memoryview(encode(obj))
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def ready(fds: Sequence[int], timeout: float, write: bool = False) -> list[int]:
    """The descriptors of ``fds`` readable (or writable) within ``timeout`` seconds. poll, not
    select: a process with hundreds of sessions has descriptors past select's limit of 1024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def raise_open_files_limit() -> None:
    """Lift this process's soft limit on open files to its hard limit (each worker holds a few
    pipes; the usual soft limit of 1024 is a few hundred sandbox sessions)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathrl-spawn")


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen_kwargs)``, forked from the process-wide launcher thread."""
    return _LAUNCHER.submit(lambda: subprocess.Popen(list(argv), **popen_kwargs)).result()


class Worker:
    """A subprocess answering messages over its own pipe pair, killable at any moment.

    ``argv`` may contain ``{request_fd}`` and ``{reply_fd}``, replaced by the descriptor
    numbers the child reads requests from and writes replies to.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdout: int = subprocess.DEVNULL,
        stderr: int = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
        reply_limit: int = MAX_REPLY_BYTES,
        start_new_session: bool = False,
    ):
        opened: list[int] = []
        try:
            request_r, request_w = os.pipe()
            opened += [request_r, request_w]
            reply_r, reply_w = os.pipe()
            opened += [reply_r, reply_w]
            fds = {"{request_fd}": str(request_r), "{reply_fd}": str(reply_w)}
            self.proc = spawn(
                [_substitute(a, fds) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, pass_fds=(request_r, reply_w, *pass_fds), start_new_session=start_new_session,
            )  # fmt: skip
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        os.close(request_r)
        os.close(reply_w)
        os.set_blocking(request_w, False)
        os.set_blocking(reply_r, False)
        self.requests, self.replies = request_w, reply_r
        self.decoder = Decoder(reply_limit)
        self.pending: deque[Any] = deque()  # messages read by wait() beyond the one it returned
        self.closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        """The reply pipe, for ``select``."""
        return self.replies

    def send(self, obj: object, deadline: float) -> None:
        """Write one message; TimeoutError if the child has not taken it all by ``deadline``
        (time.monotonic()), EOFError if the child is gone."""
        data = memoryview(encode(obj))
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the worker did not read its request in time")
            if not ready([self.requests], remaining, write=True):
                continue
            try:
                data = data[os.write(self.requests, data[: 1 << 16]) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                raise EOFError("the worker is gone") from None

    def receive(self, max_bytes: int = 1 << 20) -> list[Any]:
        """The messages completed by what can be read now, at most ``max_bytes`` of it (so a
        child that writes without end cannot keep the caller here past its deadline); possibly
        none. EOFError once the child has closed its end, ProtocolError on garbage."""
        messages: list[Any] = list(self.pending)
        self.pending.clear()
        budget = max_bytes
        while budget > 0:
            try:
                data = os.read(self.replies, min(1 << 16, budget))
            except BlockingIOError:
                return messages
            budget -= len(data)
            if not data:
                if messages:
                    return messages
                raise EOFError("the worker closed its reply pipe")
            messages += self.decoder.feed(data)
        return messages

    def wait(self, deadline: float) -> Any:
        """The next message, or None if none arrived by ``deadline``; EOFError if the child died."""
        while not self.pending:
            remaining = deadline - time.monotonic()
            if ready([self.replies], remaining):
                self.pending.extend(self.receive())
            elif remaining <= 0:
                return None
        return self.pending.popleft()

    def kill(self) -> None:
        """SIGKILL the child, reap it and close the pipes. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.requests)
        os.close(self.replies)


def _substitute(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg
