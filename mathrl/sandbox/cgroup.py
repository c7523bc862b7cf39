"""One control group per sandbox session: a memory cap and a process cap for everything in it.

Why a cgroup: RLIMIT_NPROC does not bind for root (measured: 200 of 200 forks succeeded,
also inside a user namespace, whose uid maps to host root), and RLIMIT_AS caps one
process, not a session that forks. A cgroup caps the session's tasks (``pids.max``:
processes and threads) and its memory (``memory.max``, tmpfs pages included); when the
memory runs out the kernel kills a process inside it and counts the kill, which is how a
run learns that it died of memory.

Both layouts work: cgroup v2 (one hierarchy; sessions live under ``<root>/mathrl-sandbox``,
whose memory and pids controllers this module enables) and v1 (a ``memory`` and a ``pids``
hierarchy; a session is one directory in each, under this process's own cgroup). Creating
cgroups needs write access there: root, or a delegated v1 subtree. Where there is none,
:func:`create` returns None and the sandbox says so in its ``isolation``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_COUNTER = itertools.count()
_PROBE_LOCK = threading.Lock()
_LAYOUT: tuple[int, dict[str, Path]] | bool | None = False  # False: not probed yet; None: unusable


@dataclass
class Cgroup:
    """A session's cgroup: ``dirs`` per controller (one shared dir on v2)."""

    version: int
    dirs: dict[str, Path]

    @property
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to enter the cgroup (one per hierarchy)."""
        return [d / "cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in path.read_text().split())
        return sorted(found)

    def task_count(self) -> int:
        """Tasks (processes and threads) in the session now."""
        return int((self.dirs["pids"] / "pids.current").read_text())

    def oom_kills(self) -> int:
        """How many processes the kernel killed here for lack of memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with contextlib.suppress(OSError):
            match = re.search(r"^oom_kill (\d+)$", (self.dirs["memory"] / name).read_text(), re.M)
            if match:
                return int(match.group(1))
        return 0

    def kill(self) -> None:
        """SIGKILL everything in the cgroup (a fork bomb cannot outrun it: pids.max caps its size)."""
        if self.version == 2 and (self.dirs["pids"] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.dirs["pids"] / "cgroup.kill").write_text("1")
            return
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)

    def remove(self) -> None:
        """Kill what is left and delete the directories (retrying while killed tasks exit)."""
        self.kill()
        for path in dict.fromkeys(self.dirs.values()):
            for attempt in range(200):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy: tasks still exiting
                    if attempt % 20 == 19:
                        self.kill()
                    time.sleep(0.005)


def available() -> bool:
    """Whether session cgroups can be created here (probed once per process)."""
    return _layout() is not None


def create(memory_bytes: int, max_tasks: int) -> Cgroup | None:
    """A new cgroup with these caps, or None where cgroups cannot be created here."""
    layout = _layout()
    return None if layout is None else _create_in(*layout, memory_bytes, max_tasks)


def _create_in(version: int, bases: dict[str, Path], memory_bytes: int, max_tasks: int) -> Cgroup | None:
    name = f"mathrl-sb-{os.getpid()}-{next(_COUNTER)}"
    dirs = {controller: base / name for controller, base in bases.items()}
    try:
        for path in dict.fromkeys(dirs.values()):
            path.mkdir()
        cgroup = Cgroup(version, dirs)
        if version == 2:
            _write(dirs["memory"] / "memory.max", memory_bytes)
            _write(dirs["memory"] / "memory.swap.max", 0, optional=True)
        else:
            _write(dirs["memory"] / "memory.limit_in_bytes", memory_bytes)
            _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
        _write(dirs["pids"] / "pids.max", max_tasks)
    except OSError:
        for path in dict.fromkeys(dirs.values()):
            with contextlib.suppress(OSError):
                path.rmdir()
        return None
    return cgroup


def _write(path: Path, value: int, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError:
        if not optional:
            raise


def _layout() -> tuple[int, dict[str, Path]] | None:
    """(version, base directory per controller) where session cgroups can be made; probed once."""
    global _LAYOUT
    with _PROBE_LOCK:
        if _LAYOUT is False:
            _LAYOUT = _probe()
        return _LAYOUT  # type: ignore[return-value]


def _probe() -> tuple[int, dict[str, Path]] | None:
    mounts = _cgroup_mounts()
    own = _own_cgroups()
    v1 = {c: mounts[c] for c in ("memory", "pids") if c in mounts}
    candidates: list[tuple[int, dict[str, Path]]] = []
    if len(v1) == 2:
        candidates.append((1, {c: _join(point, own.get(c, "/")) for c, point in v1.items()}))
    if "cgroup2" in mounts:
        base = mounts["cgroup2"] / "mathrl-sandbox"
        candidates.append((2, {"memory": base, "pids": base}))
    for version, bases in candidates:
        if version == 2 and not _prepare_v2(bases["memory"]):
            continue
        _remove_stale(bases)
        cgroup = _create_in(version, bases, 64 << 20, 8)
        if cgroup is not None:
            cgroup.remove()
            return version, bases
    return None


def _prepare_v2(base: Path) -> bool:
    """Make ``<v2 root>/mathrl-sandbox`` with the memory and pids controllers for its children."""
    root = base.parent
    try:
        enabled = (root / "cgroup.subtree_control").read_text().split()
        if "memory" not in enabled or "pids" not in enabled:
            (root / "cgroup.subtree_control").write_text("+memory +pids")
        base.mkdir(exist_ok=True)
        if not {"memory", "pids"} <= set((base / "cgroup.subtree_control").read_text().split()):
            (base / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError:
        return False
    return True


def _remove_stale(bases: dict[str, Path]) -> None:
    """Delete session cgroups left behind by mathrl processes that no longer exist."""
    for base in dict.fromkeys(bases.values()):
        with contextlib.suppress(OSError):
            for path in base.glob("mathrl-sb-*-*"):
                pid = int(path.name.split("-")[2])
                if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                    Cgroup(0, {"pids": path}).remove()


def _cgroup_mounts() -> dict[str, Path]:
    """Mount point per v1 controller (``memory``, ``pids``) and of the v2 hierarchy (``cgroup2``)."""
    found: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            point, fstype, options = Path(fields[4]), tail[0], tail[2].split(",")
            if fstype == "cgroup2":
                found.setdefault("cgroup2", point)
            elif fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options:
                        found.setdefault(controller, point)
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller:
                    own[controller] = path
    return own


def _join(point: Path, path: str) -> Path:
    joined = point / path.lstrip("/")
    return joined if joined.is_dir() else point
