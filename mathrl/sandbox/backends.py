"""How a session's process is started: bubblewrap (the default) or rlimits only (the fallback).

A backend turns limits into a running :mod:`mathrl.sandbox.repl` process: a
:class:`mathrl.workers.Worker` whose stdout and stderr are one pipe, plus what the session
needs to clean up. ``BACKENDS`` is the registry (``sandbox=`` choices derive from it);
:func:`resolve` picks one for ``auto`` by starting a real session with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mathrl import workers
from mathrl.sandbox import cgroup as cgroups
from mathrl.sandbox import seccomp
from mathrl.sandbox.repl import descendants
from mathrl.sandbox.types import SandboxLimits
from mathrl.workers import Worker

REPL = Path(__file__).with_name("repl.py")
WORKERS = Path(workers.__file__)
DEFAULT_PACKAGES = ("numpy", "sympy", "mpmath")
"""Importable inside a session besides the standard library (mpmath: sympy needs it)."""
MAX_OPEN_FILES = 512
INTERPRETER_MB = 64
"""Headroom over ``memory_mb + tmp_mb`` in a session's cgroup for the interpreter itself."""
SANDBOX_DIR = "/opt/mathrl"
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",  # one session, one core: no BLAS thread pools that eat max_procs
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per thread arena otherwise
    "PYTHONUNBUFFERED": "1",  # Python child processes write as they print, interleaved in order
}


class SandboxError(RuntimeError):
    """A session could not be started (the message says why and what to do)."""


@dataclass
class Launched:
    """A started session process and what closing it must undo."""

    worker: Worker
    output_fd: int
    cgroup: cgroups.Cgroup | None = None
    workdir: str | None = None
    process_group: bool = False  # the fallback: the session leads its own process group
    baseline_tasks: int | None = None  # tasks in the cgroup once the session is ready

    def repl_pid(self) -> int | None:
        """The session's Python process, as the host sees it (below bwrap's two processes)."""
        for pid in (self.worker.pid, *descendants(self.worker.pid)):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    name = f.read().split("(", 1)[1].rsplit(")", 1)[0]
            except (OSError, IndexError):
                continue
            if name not in ("bwrap", "sh"):
                return pid
        return None

    def kill(self) -> None:
        """SIGKILL the session and every process in it; reap what is ours. Idempotent.

        bubblewrap: the PID namespace's init goes first, so the kernel kills the namespace
        and bwrap reaps it all (no orphaned zombies), then the cgroup catches any straggler.
        The fallback: its descendants (a /proc walk) and its process group."""
        if self.worker.closed:
            return
        pid = self.worker.pid
        if self.process_group:
            for child in descendants(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        else:
            for init in descendants(pid, direct=True):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.proc.wait(timeout=1.0)
        if self.cgroup is not None:
            self.cgroup.kill()
        self.worker.kill()

    def close(self) -> None:
        """:meth:`kill`, then remove the cgroup, the output pipe and the working directory."""
        self.kill()
        if self.cgroup is not None:
            self.cgroup.remove()
        with contextlib.suppress(OSError):
            os.close(self.output_fd)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Backend(Protocol):
    name: str

    def isolation(self) -> str:
        """What isolates a session of this backend here, e.g. ``bwrap+cgroup+seccomp``."""
        ...

    def launch(self, limits: SandboxLimits, packages: tuple[str, ...]) -> Launched: ...


def package_dirs(packages: tuple[str, ...]) -> list[Path]:
    """The installed directory (or file) of each package, plus its bundled ``NAME.libs``."""
    found: list[Path] = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise SandboxError(f"sandbox package {name!r} is not installed in this Python (pip install {name})")
        locations = list(spec.submodule_search_locations or [])
        path = Path(locations[0]) if locations else Path(spec.origin or "")
        found.append(path)
        libs = path.with_name(f"{name}.libs")
        if libs.is_dir():
            found.append(libs)
    return found


def _repl_config(limits: SandboxLimits, path: list[str], hide: list[str], pidns: bool, procs: int | None) -> str:
    return json.dumps(
        {
            "request_fd": "{request_fd}", "reply_fd": "{reply_fd}", "path": path, "hide": hide, "pidns": pidns,
            "max_file_bytes": limits.max_file_mb << 20,
            "max_open_files": MAX_OPEN_FILES, "max_user_procs": procs,
        }
    )  # fmt: skip


def _user_process_limit(max_procs: int) -> int | None:
    """RLIMIT_NPROC for a non-root user: the processes the user has now plus ``max_procs``
    (the limit counts all of the user's processes). None for root, where it does not bind."""
    uid = os.getuid()
    if uid == 0:
        return None
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                count += len(os.listdir(f"/proc/{entry}/task"))
    return count + max_procs


_DEVICES = [
    a for dev in ("null", "zero", "full", "random", "urandom") for a in ("--dev-bind", f"/dev/{dev}", f"/dev/{dev}")
]
"""The device nodes a session gets. No ``/proc``: procfs has host-global files that check only
the uid (``/proc/sys/*``, ``/proc/sysrq-trigger``), and when mathrl runs as root the
session's uid maps to host root (measured: it could write /proc/sys/vm/drop_caches)."""


class BwrapBackend:
    """bubblewrap: own user, PID, network, IPC, UTS and cgroup namespaces; a read-only root
    made of the interpreter's directories and five device nodes; a private tmpfs ``/tmp``
    (``/dev/shm`` links to it); no ``/proc``; an empty environment; uid 65534; a cgroup and a
    seccomp filter where available."""

    name = "bwrap"

    def isolation(self) -> str:
        parts = ["bwrap"]
        if cgroups.available():
            parts.append("cgroup")
        if seccomp.program() is not None:
            parts.append("seccomp")
        return "+".join(parts)

    def launch(self, limits: SandboxLimits, packages: tuple[str, ...]) -> Launched:
        binary = shutil.which("bwrap")
        if binary is None:
            raise SandboxError("bubblewrap is not installed: apt-get install -y bubblewrap (or use sandbox=rlimit)")
        mounts = _interpreter_mounts()
        site = f"{SANDBOX_DIR}/site"
        for path in package_dirs(packages):
            mounts += ["--ro-bind", str(path), f"{site}/{path.name}"]
        lib = f"{SANDBOX_DIR}/lib"
        mounts += ["--ro-bind", str(REPL), f"{lib}/repl.py", "--ro-bind", str(WORKERS), f"{lib}/workers.py"]
        group = None
        if cgroups.available():
            memory = (limits.memory_mb + limits.tmp_mb + INTERPRETER_MB) << 20
            group = cgroups.create(memory, limits.max_procs + 2)  # + bwrap's own two processes
            if group is None:
                raise SandboxError("could not create the session's cgroup (it worked a moment ago)")
        procs = None if group is not None else _user_process_limit(limits.max_procs)
        config = _repl_config(limits, [lib, site], [lib], pidns=True, procs=procs)
        env = [a for key, value in {**ENV, "HOME": "/tmp", "TMPDIR": "/tmp"}.items() for a in ("--setenv", key, value)]
        filter_fd = seccomp.program_fd()
        argv = [
            binary, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--clearenv", *env, *mounts, *_DEVICES,
            "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp", "--symlink", "/tmp", "/dev/shm",
            "--remount-ro", "/", "--chdir", "/tmp",
            *(["--seccomp", str(filter_fd)] if filter_fd is not None else []),
            "--", os.path.realpath(sys.executable), "-I", "-S", "-B", f"{lib}/repl.py", config,
        ]  # fmt: skip
        if group is not None:  # enter the cgroup before bwrap starts, so everything it forks is inside
            files = [str(f) for f in group.procs_files]
            script = (
                'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
            )
            argv = ["/bin/sh", "-c", script, "sh", str(len(files)), *files, *argv]
        return _start(argv, group=group, pass_fds=() if filter_fd is None else (filter_fd,))

    def __repr__(self) -> str:
        return "BwrapBackend()"


class RlimitBackend:
    """A plain subprocess with rlimits, an environment of a few fixed variables, a private
    working directory and its own process group. No namespaces: the code can read what the
    user can read, reach the network, and signal the user's other processes."""

    name = "rlimit"

    def isolation(self) -> str:
        return "rlimit"

    def launch(self, limits: SandboxLimits, packages: tuple[str, ...]) -> Launched:
        workdir = tempfile.mkdtemp(prefix="mathrl-sandbox-")
        lib = str(WORKERS.parent)
        site = sorted({str(p.parent) for p in package_dirs(packages)})
        config = _repl_config(limits, [lib, *site], [lib], pidns=False, procs=_user_process_limit(limits.max_procs))
        env = {**ENV, "HOME": workdir, "TMPDIR": workdir}
        argv = [sys.executable, "-I", "-S", "-B", str(REPL), config]
        try:
            return _start(argv, workdir=workdir, env=env, cwd=workdir, new_session=True)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise


def _start(
    argv: list[str],
    *,
    group: cgroups.Cgroup | None = None,
    workdir: str | None = None,
    pass_fds: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    new_session: bool = False,
) -> Launched:
    opened: list[int] = []
    try:
        out_r, out_w = os.pipe()
        opened += [out_r, out_w]
        worker = Worker(
            argv, env=env if env is not None else {}, cwd=cwd, stdout=out_w, stderr=out_w, pass_fds=pass_fds,
            start_new_session=new_session,
        )  # fmt: skip
    except BaseException:  # nothing started: undo what was made for it
        for fd in opened:
            os.close(fd)
        if group is not None:
            group.remove()
        raise
    finally:
        for fd in pass_fds:
            os.close(fd)
    os.close(out_w)
    os.set_blocking(out_r, False)
    return Launched(worker, out_r, cgroup=group, workdir=workdir, process_group=new_session)


def read_all(fd: int, limit: int = 1 << 16) -> bytes:
    """What a non-blocking pipe holds now, up to ``limit`` bytes."""
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
            data += chunk
    return data


def _interpreter_mounts() -> list[str]:
    """bwrap arguments that make this Python runnable: /usr, the top-level library links or
    directories, the interpreter's prefix when it lives elsewhere (pyenv, conda), ld.so.cache."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    binary = Path(os.path.realpath(sys.executable))
    prefixes = {Path(os.path.realpath(p)) for p in (sys.base_prefix, sys.base_exec_prefix)} | {binary.parent}
    for prefix in sorted(prefixes):
        if not any(prefix.is_relative_to(root) for root in (Path("/usr"), *(p for p in prefixes if p != prefix))):
            args += ["--ro-bind", str(prefix), str(prefix)]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


BACKENDS: dict[str, Backend] = {"bwrap": BwrapBackend(), "rlimit": RlimitBackend()}
CHOICES = ("auto", *BACKENDS)
"""Values of ``sandbox=``: ``auto`` takes the strongest backend that works here."""

_RESOLVED: dict[str, tuple[Backend, str | None]] = {}
_RESOLVE_LOCK = threading.Lock()


def resolve(name: str) -> Backend:
    """The backend called ``name``; for ``auto``, bwrap if a real session starts with it here,
    else the fallback (with one warning per process that says what is not isolated)."""
    if name not in CHOICES:
        raise SandboxError(f"unknown sandbox backend {name!r}; choose one of {', '.join(CHOICES)}")
    if name != "auto":
        return BACKENDS[name]
    with _RESOLVE_LOCK:
        if "auto" not in _RESOLVED:
            problem = probe(BACKENDS["bwrap"]) if shutil.which("bwrap") else "bwrap is not installed"
            if problem and not problem.startswith(("bwrap", "bubblewrap")):
                # bubblewrap is there and set up its sandbox, but the session failed for another
                # reason (out of file descriptors, a slow start): not a reason to drop isolation
                raise SandboxError(f"a bubblewrap test session failed: {problem}; retry, or choose sandbox=rlimit")
            chosen = BACKENDS["rlimit"] if problem else BACKENDS["bwrap"]
            _RESOLVED["auto"] = (chosen, problem)
            if problem:
                print(
                    f"warning: mathrl.sandbox: bubblewrap does not work here ({problem}); model-written code runs "
                    "with rlimits only: it can read your files, use the network and signal your processes. "
                    "For the real sandbox: apt-get install -y bubblewrap (user namespaces must be enabled).",
                    file=sys.stderr,
                )
        return _RESOLVED["auto"][0]


def probe(backend: Backend, timeout: float = 30.0) -> str | None:
    """None if a session of ``backend`` starts and answers here, else the reason it does not."""
    try:
        launched = backend.launch(SandboxLimits(), ())
    except (SandboxError, OSError) as e:
        return str(e)
    try:
        return wait_ready(launched, timeout)
    finally:
        launched.close()


def wait_ready(launched: Launched, timeout: float) -> str | None:
    """Wait for a started session's "ready"; None when it came, else why not (the last line the
    session printed, e.g. bubblewrap's error), with the session killed."""
    try:
        if launched.worker.wait(time.monotonic() + timeout) == {"ready": True}:
            return None
    except (EOFError, OSError, workers.ProtocolError):
        pass
    launched.kill()
    lines = read_all(launched.output_fd).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"no answer within {timeout:g} s"
