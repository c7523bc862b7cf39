"""The seccomp filter of a bubblewrap session, compiled by libseccomp (through ctypes).

Every system call is allowed except those that reach past the sandbox or attack the
kernel, which fail with EPERM (bubblewrap loads the program with ``--seccomp FD``):

- other processes and namespaces: ``ptrace``, ``process_vm_readv/writev``, ``unshare``,
  ``setns``, and ``clone`` with any ``CLONE_NEW*`` flag (``clone3``, whose flags seccomp
  cannot read, answers ENOSYS, so the C library falls back to ``clone``);
- mounts and roots: ``mount``, ``umount2``, the new mount API, ``pivot_root``, ``chroot``;
- the kernel: ``kexec_*``, ``*_module``, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*``, ``keyctl``/``add_key``/``request_key``, ``reboot``, ``swapon/off``,
  ``open_by_handle_at``;
- the network: ``socket`` and ``socketpair`` of any family but AF_UNIX (EAFNOSUPPORT);
- file metadata: ``chmod``/``chown``/``utime``/``*xattr`` and their variants. The writable
  places of a session are its own tmpfs and the device nodes bound from the host; as root the
  session's uid maps to host root, so without this rule it could chmod the host's
  ``/dev/null`` (measured: ``os.chmod``/``os.utime`` on it succeeded). Code in a session
  cannot change a file's mode either (``shutil.copy``'s mode copy fails).

System calls of another architecture (32-bit ``int 0x80`` on x86-64) kill the process:
libseccomp's default for a foreign architecture. The filter is built once per process;
:func:`program` returns None where libseccomp is missing (then there is no filter, and
``isolation`` says so).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import threading

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE = 1
_SCMP_CMP_MASKED_EQ = 7
_CLONE_NEW_FLAGS = {  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
    "newns": 0x00020000, "newcgroup": 0x02000000, "newuts": 0x04000000, "newipc": 0x08000000,
    "newuser": 0x10000000, "newpid": 0x20000000, "newnet": 0x40000000,
}  # fmt: skip

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "reboot", "swapon", "swapoff", "open_by_handle_at",
    "name_to_handle_at", "acct", "quotactl", "syslog", "lookup_dcookie", "vhangup",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
    "utimensat", "futimesat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "mknod", "mknodat",
)  # fmt: skip
"""System calls that fail with EPERM inside a session."""


def _action_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_LOCK = threading.Lock()
_PROGRAM: bytes | bool | None = False


def program() -> bytes | None:
    """The compiled BPF program (bytes for ``bwrap --seccomp``), or None without libseccomp."""
    global _PROGRAM
    with _LOCK:
        if _PROGRAM is False:
            try:
                _PROGRAM = _compile()
            except (OSError, AttributeError, RuntimeError):
                _PROGRAM = None
        return _PROGRAM  # type: ignore[return-value]


def _compile() -> bytes:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise RuntimeError("seccomp_init failed")

    def rule(action: int, name: str, *comparisons: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call on this architecture (e.g. a newer one)
            return
        array = (_ArgCmp * max(1, len(comparisons)))(*(_ArgCmp(*c) for c in comparisons))
        result = lib.seccomp_rule_add_array(ctx, action, number, len(comparisons), array)
        if result < 0:
            raise RuntimeError(f"seccomp rule for {name}: {os.strerror(-result)}")

    try:
        for name in DENIED:
            rule(_action_errno(errno.EPERM), name)
        for flag in _CLONE_NEW_FLAGS.values():
            rule(_action_errno(errno.EPERM), "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        rule(_action_errno(errno.ENOSYS), "clone3")
        for name in ("socket", "socketpair"):
            rule(_action_errno(errno.EAFNOSUPPORT), name, (0, _SCMP_CMP_NE, socket.AF_UNIX, 0))
        fd = os.memfd_create("mathrl-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                raise RuntimeError("seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 1 << 16):
                data += chunk
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    return data


def program_fd() -> int | None:
    """A fresh descriptor holding the program, positioned at its start (bwrap reads it to the end)."""
    data = program()
    if data is None:
        return None
    fd = os.memfd_create("mathrl-seccomp")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
