"""Run model-written Python on the user's own machine, isolated by the operating system.

    from mathrl.sandbox import Sandbox, SandboxLimits, ExecResult
    with Sandbox(SandboxLimits(wall_s=10)) as sb:   # one persistent session: state survives
        sb.run("x = 6*7\\nprint(x)")                # ExecResult(output='42\\n', error=None, ...)
        sb.run("x + 1")                            # a trailing expression's repr: '43\\n'
        sb.isolation                               # e.g. 'bwrap+cgroup+seccomp'

Default backend ``bwrap`` (bubblewrap; no daemon, no Docker, no cloud account). What it
isolates, in plain words:

- **Network**: none. The session has its own network namespace (a loopback of its own,
  not the host's), and the seccomp filter refuses every socket family but AF_UNIX.
- **Files**: the session sees only what the interpreter needs, read-only: ``/usr``, the
  library links, the interpreter's own prefix (e.g. pyenv's), ``/etc/ld.so.cache``, and
  the allowed packages (numpy, sympy, mpmath by default). Not the home directory, not the
  project checkout, not ``/etc``, not the host's ``/tmp`` or ``/dev/shm``. The only
  writable place is a private tmpfs ``/tmp`` of ``tmp_mb`` (also the working directory and
  ``$HOME``), gone when the session ends.
- **Processes**: own PID namespace (the code sees and can signal only its own processes;
  ``kill(-1)`` stays inside), own IPC and UTS namespaces, a new terminal session, killed
  when the parent dies. After each run every process the code started is killed; a run
  that leaves threads running gets its session restarted.
- **Identity**: uid/gid 65534 in a user namespace that cannot create further ones. When
  mathrl runs as root, that uid maps to host root: the namespaces, the mounts and seccomp
  contain it, file permissions do not (so nothing private is mounted). Run as a normal
  user for one more layer.
- **Environment**: empty but for PATH, HOME, TMPDIR, LANG and thread-count variables.
- **Kernel surface**: seccomp refuses ptrace, mount, unshare/setns, new namespaces via
  clone, kexec, modules, bpf, perf, userfaultfd, io_uring, keyrings, and file-metadata
  changes (chmod, chown, utime, xattrs: the host's device nodes are bound in) (:mod:`.seccomp`).
- **Resources**: CPU seconds (RLIMIT_CPU, per run), file size (RLIMIT_FSIZE), address
  space (RLIMIT_AS over what the interpreter maps at start), open files; memory and
  process count of the whole session by a cgroup (v1 or v2); the wall-clock deadline is
  enforced from outside by killing the session's cgroup and process tree; output is capped
  while it is read, so a flood cannot fill the parent's memory.

What it does not isolate: the kernel itself (a kernel exploit escapes any namespace
sandbox; use a VM for hostile code), CPU time of other sessions (many sessions share the
cores; the per-run limits bound each), and the files that are mounted (readable: they are
public system files). Without writable cgroups (a non-root user, most often), memory is
capped per process only and processes by RLIMIT_NPROC; as root without cgroups, the
process count is not capped at all (``isolation`` then lacks ``cgroup``), and threads a run
leaves behind are noticed only when Python's ``threading`` started them. The code runs in the
session's own interpreter, so it can read that interpreter's memory and write to its reply
pipe: a reply that is not the one expected (each names its cell) ends the session.

Fallback backend ``rlimit`` (where bubblewrap or user namespaces are missing, e.g. a Mac
or a locked-down container): a subprocess with the same rlimits, a scrubbed environment,
a private working directory and its own process group. It does **not** isolate the
network, the filesystem (the code can read and write whatever the user can) or other
processes (the code can signal the user's processes, the parent included). ``sandbox=auto``
takes bubblewrap when a real session starts with it and says once, on stderr, when it
falls back. Layout: ``types`` (limits, results), ``session`` (:class:`Sandbox`,
:func:`run_many`), ``backends``, ``cgroup``, ``seccomp``, ``output`` (the cap), ``repl``
(runs inside the session).
"""

from mathrl.sandbox.backends import BACKENDS, CHOICES, DEFAULT_PACKAGES, SandboxError
from mathrl.sandbox.session import Sandbox, run_many
from mathrl.sandbox.types import ERROR_KINDS, ExecResult, SandboxLimits

__all__ = [
    "BACKENDS",
    "CHOICES",
    "DEFAULT_PACKAGES",
    "ERROR_KINDS",
    "ExecResult",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "run_many",
]
