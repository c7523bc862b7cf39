"""The persistent Python session inside a sandbox. It runs there, not in mathrl's process.

Started by :mod:`mathrl.sandbox` as ``python -I -S -B repl.py CONFIG_JSON``; reads cells
from the request pipe and answers one reply per cell (:mod:`mathrl.workers` messages).
Cells run in one namespace, so state survives between them; a trailing expression's repr
is printed, as in a notebook. The cell's stdout and stderr, and those of any process it
starts, are file descriptors 1 and 2: one pipe that the parent reads and caps.

Limits set here are the in-process half: the file-size cap, an open-files cap, no core
dumps (the parent sets the address-space cap from outside), and per cell a
CPU-time soft limit (SIGXCPU) and a wall-clock timer (SIGALRM) that interrupt pure-Python
code with the session kept. Nothing here is trusted by the parent, which kills the
whole session at the hard deadline and checks for left-over processes itself; the code
in a cell runs in this very process and could subvert this file.

After each cell every other process in the session is killed (in a bubblewrap session,
``kill(-1)`` inside the PID namespace; in the rlimit fallback, this process is a child
subreaper and kills its descendants), and threads the cell left running are reported,
so the parent restarts the session instead of letting them run on.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import math
import os
import resource
import signal
import sys
import time
import traceback


class CellTimeout(BaseException):
    """Raised into a cell past its CPU or wall time (a BaseException: the cell's ``except
    Exception`` does not swallow it)."""


_IN_CELL = False
_REASON = ""
_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    global _REASON
    if _IN_CELL:
        _REASON = "CPU time" if signum == signal.SIGXCPU else "wall-clock time"
        raise CellTimeout


def main() -> None:
    config = json.loads(sys.argv[1])
    sys.path[:0] = config["path"]
    from workers import read_message, write_message  # mathrl/workers.py, mounted or on the path

    del sys.modules["workers"]  # keep it private: the cell's `import workers` finds nothing here
    for entry in config["hide"]:
        sys.path.remove(entry)
    requests, replies = int(config["request_fd"]), int(config["reply_fd"])
    stream = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    stream.reconfigure(write_through=True)
    _set_limits(config)
    pidns = config["pidns"]
    if not pidns:
        _become_subreaper()
    baseline_threads = _thread_count()
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": __builtins__}
    write_message(replies, {"ready": True})
    for index in range(1, 1 << 62):
        try:
            request = read_message(requests)
        except EOFError:
            return
        sys.stdout = sys.stderr = stream
        sys.stdin = sys.__stdin__  # /dev/null: input() sees end of file instead of hanging
        cell = request.pop("cell")
        error = _run_cell(request.pop("code"), index, namespace, request["cpu_s"], request["wall_s"])
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        _kill_strays(pidns)
        write_message(replies, {"cell": cell, "error": error, "threads": _thread_count() - baseline_threads})


def _set_limits(config: dict) -> None:
    """The caps this process sets on itself (the address-space cap is set by the parent, which
    can read how much this process maps: a session has no /proc)."""
    for limit, value in (
        (resource.RLIMIT_FSIZE, config["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, config["max_open_files"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, config.get("max_user_procs")),
    ):
        if value is not None:
            with contextlib.suppress(ValueError, OSError):  # a hard limit already lower
                resource.setrlimit(limit, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of killing


def _run_cell(code: str, index: int, namespace: dict[str, object], cpu_s: float, wall_s: float) -> str | None:
    """Compile and run one cell; print what a notebook would; return the error kind or None."""
    global _IN_CELL, _REASON
    _REASON = ""
    filename = f"<cell {index}>"
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            expression = tree.body.pop()
            assert isinstance(expression, ast.Expr)
            last = compile(ast.Expression(expression.value), filename, "eval")
        body = compile(tree, filename, "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in the source
        print("".join(traceback.format_exception_only(type(e), e)), end="")
        return "syntax"
    except (MemoryError, RecursionError) as e:
        print(f"{type(e).__name__}: the cell is too large or too deeply nested to compile")
        return "memory" if isinstance(e, MemoryError) else "syntax"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(used + cpu_s)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_CPU, (soft if cpu_hard == resource.RLIM_INFINITY else min(soft, cpu_hard), cpu_hard)
        )
    signal.signal(signal.SIGXCPU, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    caught: BaseException | None = None
    try:
        _IN_CELL = True
        signal.setitimer(signal.ITIMER_REAL, wall_s)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
    except BaseException as e:
        caught = e
    finally:
        if os.getpid() != _PID:  # a process the cell forked has run off its end: it must not
            os._exit(0)  # go on to answer the parent or read the next cell
        _IN_CELL = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    return _report(caught, cpu_s if _REASON == "CPU time" else wall_s)


def _report(caught: BaseException | None, limit: float) -> str | None:
    """Print how the cell ended; the error kind (None: it ran to the end, or exited with status 0)."""
    if caught is None:
        return None
    if isinstance(caught, CellTimeout):
        print(f"TimeoutError: the cell ran past its {_REASON} limit ({limit:g} s) and was interrupted")
        return "timeout"
    if isinstance(caught, SystemExit):
        print("SystemExit" if caught.code is None else f"SystemExit: {caught.code}")
        return None if caught.code in (None, 0) else "runtime"
    _print_exception(caught)
    return "memory" if isinstance(caught, MemoryError) else "runtime"


def _print_exception(e: BaseException) -> None:
    """The traceback from the cell's own frames down (this file's frame left out)."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    with contextlib.suppress(Exception):
        print("".join(traceback.format_exception(type(e), e, tb)), end="")
        return
    print(f"{type(e).__name__}")


def _kill_strays(pidns: bool) -> None:
    """Kill every process the cell left (daemons included)."""
    for _ in range(1000):
        if pidns:
            try:
                os.kill(-1, signal.SIGKILL)  # in our PID namespace: all but init and ourselves
            except ProcessLookupError:
                return
        else:
            _reap()
            below = descendants(os.getpid())
            if not below:
                return
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap()
        time.sleep(0.001)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def descendants(root: int, direct: bool = False) -> list[int]:
    """Living processes below ``root``, or only its children (Linux /proc; zombies not listed).
    The parent uses it too."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                    if fields[0] != "Z":
                        parents[int(entry)] = int(fields[1])
    mine: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
        if direct:
            break
    return sorted(mine)


def _become_subreaper() -> None:
    """Orphans of the cell's processes become our children (Linux), so :func:`_kill_strays` finds them."""
    with contextlib.suppress(OSError, AttributeError, ImportError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _thread_count() -> int:
    """Threads of this process: all of them where /proc exists, Python's own otherwise (the
    parent counts a bubblewrap session's tasks in its cgroup)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


if __name__ == "__main__":
    main()
