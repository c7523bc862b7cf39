"""The attack battery: one property per test, each asserting that the attack was contained
*and* that the host is unharmed (this process alive, no file outside the sandbox, no
process left, the loopback server got no connection).

``BOTH`` attacks run on bubblewrap and on the rlimit fallback; ``BWRAP`` attacks only on
bubblewrap: the fallback does not isolate the network, the filesystem or other processes,
and as root it cannot cap processes or hold rlimits down (it says so in its docstring).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import secrets
import signal
import time
from pathlib import Path

import pytest
from sandbox_util import FAST, LoopbackServer, infrastructure, open_session, processes_with, session_processes

BOTH = ["bwrap", "rlimit"]
BWRAP = ["bwrap"]
REPO = Path(__file__).resolve().parent.parent
ROOT = os.getuid() == 0


def usable_after(sb) -> None:
    """The session answers again (restarted or not)."""
    result = sb.run("print(6 * 7)")
    assert (result.output, result.error) == ("42\n", None), result


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- time


@pytest.mark.parametrize("backend", BOTH)
def test_infinite_loop(backend):
    with open_session(backend) as sb:
        result = sb.run("n = 0\nwhile True:\n    n += 1")
        assert result.error == "timeout" and result.duration_s < FAST.wall_s + 1.5
        assert sb.run("n > 0").output == "True\n"  # interrupted, session kept
        assert len(session_processes(sb)) == infrastructure(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_sleep_past_the_deadline(backend):
    with open_session(backend) as sb:
        result = sb.run("import time\ntime.sleep(3600)")
        assert result.error == "timeout" and result.duration_s < FAST.wall_s + 1.5
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_huge_power_in_one_c_call(backend):
    with open_session(backend) as sb:
        result = sb.run("10**(10**8)")  # CPython checks for signals inside big-int pow: interrupted
        assert result.error == "timeout" and result.duration_s < FAST.wall_s + 2
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_ignoring_sigterm_sigalrm_and_sigxcpu(backend):
    with open_session(backend) as sb:
        result = sb.run(
            "import signal\n"
            "for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n"
            "    pass"
        )
        assert (result.error, result.state_lost) == ("timeout", True)
        assert result.duration_s < FAST.wall_s + 2
        usable_after(sb)


# ----------------------------------------------------------------------------- memory and processes


@pytest.mark.parametrize("backend", BOTH)
def test_memory_bomb(backend):
    with open_session(backend) as sb:
        rss = _rss_mb()
        big = sb.run("x = bytearray(8 * 1024**3)")
        assert big.error == "memory" and "MemoryError" in big.output and not big.state_lost
        creeping = sb.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))")
        assert creeping.error == "memory"
        assert sb.run("len(chunks) * 16 <= 256").output == "True\n"  # capped at memory_mb
        assert _rss_mb() - rss < 100  # none of it landed in this process
        usable_after(sb)


def test_memory_of_a_whole_session_is_capped_by_its_cgroup():
    with open_session("bwrap") as sb:
        if sb._launched.cgroup is None:
            pytest.fail("no cgroup here: the session's total memory is not capped")
        code = (
            "import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = bytearray(200 * 1024**2)\n        import time; time.sleep(30)\n        os._exit(0)\n"
            "    kids.append(pid)\nimport time; time.sleep(1.5)\n"
            "print(sum(os.waitpid(k, os.WNOHANG)[0] == k for k in kids), 'children died')"
        )  # 4 x 200 MB, each under its own address-space cap, 800 MB > the session's 256+8+64 MB
        group = sb._launched.cgroup
        result = sb.run(code)
        assert group.oom_kills() >= 1, result
        usage = int((group.dirs["memory"] / "memory.max_usage_in_bytes").read_text()) if group.version == 1 else 0
        assert usage <= (256 + 8 + 64) << 20
        usable_after(sb)


@pytest.mark.parametrize("backend", BWRAP if ROOT else BOTH)
def test_fork_bomb(backend):
    with open_session(backend) as sb:
        before = len(os.listdir("/proc"))
        result = sb.run("import os\nwhile True:\n    os.fork()")
        assert result.error in ("runtime", "timeout")
        assert len(session_processes(sb)) <= infrastructure(sb)
        assert len(os.listdir("/proc")) <= before + 5
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_thread_bomb(backend):
    with open_session(backend) as sb:
        result = sb.run(
            "import threading, time\nfor _ in range(100000):\n"
            "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()"
        )
        assert result.error == "runtime" and "can't start new thread" in result.output
        assert result.state_lost and "thread(s) running" in result.output  # the threads died with it
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_double_fork_daemon_cannot_act_after_the_run_returns(backend, tmp_path):
    token = secrets.token_hex(8)
    marker = tmp_path / "daemon-wrote-this"
    with open_session(backend) as sb:
        code = f"""
import os, sys, subprocess
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        write = "import time; time.sleep(1.0); open({str(marker)!r}, 'w').write('x')"
        subprocess.Popen([sys.executable, "-c", write, "{token}"])
        os._exit(0)
    os._exit(0)
import time; time.sleep(0.3)
"""
        result = sb.run(code)
        assert result.error is None
        assert processes_with(token) == []  # gone the moment run() returned
        time.sleep(1.5)
        assert not marker.exists()
        assert len(session_processes(sb)) == infrastructure(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_file_descriptor_exhaustion(backend):
    with open_session(backend) as sb:
        result = sb.run("files = []\nwhile True:\n    files.append(open('/dev/null'))")
        assert result.error == "runtime" and "Too many open files" in result.output
        assert sb.run("len(files) < 1000").output == "True\n"
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_deep_recursion(backend):
    with open_session(backend) as sb:
        plain = sb.run("def f(n):\n    return f(n + 1)\nf(0)")
        assert plain.error == "runtime" and "RecursionError" in plain.output and not plain.state_lost
        nested = "import sys\nsys.setrecursionlimit(10**8)\nl = []\nfor _ in range(10**6):\n    l = [l]\nrepr(l)"
        unlimited = sb.run(nested)  # repr recurses in C: the C stack overflows, the process crashes
        assert unlimited.error == "runtime" and unlimited.state_lost
        assert "killed by signal SIGSEGV" in unlimited.output
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_exit_mid_cell(backend):
    with open_session(backend) as sb:
        sb.run("kept = 1")
        soft = sb.run("import sys\nprint('before')\nsys.exit(2)\nprint('after')")
        assert soft.output == "before\nSystemExit: 2\n" and soft.error == "runtime" and not soft.state_lost
        hard = sb.run("import os\nprint('before', flush=True)\nos._exit(0)")
        assert hard.output.startswith("before\n") and hard.error == "runtime" and hard.state_lost
        assert "exited with status 0" in hard.output
        assert "NameError" in sb.run("kept").output


@pytest.mark.parametrize("backend", BOTH)
def test_input_with_no_stdin_does_not_hang(backend):
    with open_session(backend) as sb:
        result = sb.run("answer = input('your answer? ')")
        assert result.error == "runtime" and "EOFError" in result.output and result.duration_s < 1


@pytest.mark.parametrize("backend", BOTH)
def test_ten_megabyte_code_strings(backend):
    with open_session(backend, dataclasses.replace(FAST, wall_s=10, cpu_s=10)) as sb:
        literal = sb.run("s = '" + "a" * (10 << 20) + "'\nlen(s)")
        assert (literal.output, literal.error) == (f"{10 << 20}\n", None)
        statements = sb.run("x = 1\n" * ((10 << 20) // 6))  # 1.7 million statements to compile
        assert statements.error in (None, "memory", "timeout")
        usable_after(sb)


# ----------------------------------------------------------------------------- output


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood(backend, stream):
    with open_session(backend) as sb:
        rss = _rss_mb()
        result = sb.run(f"import sys\nwhile True:\n    sys.{stream}.write('flood' * 1000)")
        assert (result.error, result.state_lost) == ("output_limit", True)
        assert len(result.output) <= FAST.max_output_chars and "characters cut" in result.output
        assert result.duration_s < FAST.wall_s
        assert _rss_mb() - rss < 50
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_nul_and_invalid_utf8_output(backend):
    with open_session(backend) as sb:
        result = sb.run("import os\nos.write(1, b'a\\x00b\\xff\\xfec\\n')\nprint('\\udcff')")
        assert result.output.startswith("a\\x00b\\xff\\xfec\n")
        assert "\x00" not in result.output
        result.output.encode("utf-8")  # valid text for a tokenizer
        usable_after(sb)


# ----------------------------------------------------------------------------- files and secrets


@pytest.mark.parametrize("backend", BOTH)
def test_file_size_cap(backend):
    with open_session(backend) as sb:
        result = sb.run("open('big', 'wb').write(b'x' * (8 * 1024**2))")
        assert result.error == "runtime" and "File too large" in result.output
        usable_after(sb)


def test_disk_fill():
    with open_session("bwrap") as sb:
        result = sb.run("i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 1024**2)\n    i += 1")
        assert result.error == "runtime" and "No space left on device" in result.output
        assert sb.run("i <= 8").output == "True\n"  # tmp_mb
        assert not any(Path("/tmp").glob("f0")), "written on the host"
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_parent_environment_secret(backend, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("MATHRL_TEST_SECRET", secret)
    with open_session(backend) as sb:
        result = sb.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('MATHRL_TEST_SECRET'))")
        assert secret not in result.output and result.output.endswith("None\n")


def test_proc_environ_secret(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("MATHRL_TEST_SECRET", secret)
    with open_session("bwrap") as sb:
        for path in ("/proc/1/environ", f"/proc/{os.getpid()}/environ", "/proc/self/environ"):
            result = sb.run(f"open({path!r}, 'rb').read()")
            assert secret not in result.output and "No such file" in result.output


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "home", "checkout"])
def test_reading_host_files(path, tmp_path):
    secret = secrets.token_hex(16)
    planted = None
    if path == "home":
        planted = Path.home() / f".mathrl-sandbox-test-{secret[:8]}"
        planted.write_text(secret)
        path = str(planted)
    elif path == "checkout":
        planted = REPO / f".mathrl-sandbox-test-{secret[:8]}"
        planted.write_text(secret)
        path = str(planted)
    try:
        with open_session("bwrap") as sb:
            result = sb.run(f"print(open({path!r}).read())")
            assert result.error == "runtime" and "No such file or directory" in result.output
            assert secret not in result.output
            listing = sb.run(f"import os\nprint(os.path.exists({str(REPO)!r}))")
            assert listing.output == "False\n"
    finally:
        if planted is not None:
            planted.unlink()


@pytest.mark.parametrize("target", ["/usr/mathrl-x", "/tmp/mathrl-x", "/dev/shm/mathrl-x", "checkout"])
def test_writing_host_places(target):
    token = secrets.token_hex(8)
    path = str(REPO / f"mathrl-x-{token}") if target == "checkout" else f"{target}-{token}"
    with open_session("bwrap") as sb:
        result = sb.run(f"open({path!r}, 'w').write('x')")
        if target in ("/tmp/mathrl-x", "/dev/shm/mathrl-x"):
            assert result.error is None  # the session's own /tmp (and /dev/shm, a link to it)
        else:
            assert result.error == "runtime"
            assert "Read-only file system" in result.output or "No such file or directory" in result.output
    assert not Path(path).exists(), f"{path} was written on the host"


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("family", ["inet", "inet6"])
def test_connect_to_the_host_loopback(family):
    server = LoopbackServer()
    try:
        with open_session("bwrap") as sb:
            host = "127.0.0.1" if family == "inet" else "::1"
            result = sb.run(f"import socket\nsocket.create_connection(({host!r}, {server.port}), timeout=1)")
            assert result.error == "runtime"
            assert "Address family not supported" in result.output or "refused" in result.output
            raw = sb.run("import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)")
            assert raw.error == "runtime"
        time.sleep(0.2)
        assert server.accepted == 0
    finally:
        server.close()


def test_dns_lookup():
    with open_session("bwrap") as sb:
        result = sb.run("import socket\nsocket.getaddrinfo('example.com', 443)")
        assert result.error == "runtime" and "gaierror" in result.output
        unix = sb.run("import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('/tmp/sock')\n'ok'")
        assert unix.output == "'ok'\n"  # AF_UNIX inside the session is allowed


# ----------------------------------------------------------------------------- the kernel and other processes


def test_ctypes_unshare_ptrace_and_mount():
    with open_session("bwrap") as sb:
        code = (
            "import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "calls = [('unshare', lambda: libc.unshare(0x10000000)), ('ptrace', lambda: libc.ptrace(16, 1, 0, 0)),\n"
            "         ('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)),\n"
            "         ('setns', lambda: libc.setns(0, 0))]\n"
            "[(name, call(), os.strerror(ctypes.get_errno())) for name, call in calls]"
        )
        result = sb.run(code)
        assert result.error is None
        assert "'unshare', -1, 'Operation not permitted'" in result.output
        assert "'ptrace', -1, 'Operation not permitted'" in result.output
        assert "'mount', -1, 'Operation not permitted'" in result.output
        assert "'setns', -1" in result.output


def test_kill_the_parent():
    with open_session("bwrap") as sb:
        result = sb.run(
            "import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n        print(e)\nprint('still here')"
        )
        assert "still here" in result.output
        assert os.path.exists(f"/proc/{os.getpid()}")
        usable_after(sb)


def test_kill_everything():
    with open_session("bwrap") as bystander, open_session("bwrap") as sb:
        bystander.run("alive = 'yes'")
        result = sb.run(
            "import os, signal, subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "os.kill(-1, signal.SIGKILL)\n"
            "'survived'"
        )
        assert result.output == "'survived'\n"  # kill(-1) reaches only the session's own processes
        assert bystander.run("alive").output == "'yes'\n"
        usable_after(sb)


@pytest.mark.parametrize("backend", BWRAP if ROOT else BOTH)
def test_raising_its_own_rlimits(backend):
    with open_session(backend) as sb:
        result = sb.run(
            "import resource\nfor r in (resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE, resource.RLIMIT_AS):\n"
            "    try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "        print('raised', r)\n    except (ValueError, OSError):\n        print('refused', r)"
        )
        assert "raised" not in result.output and result.output.count("refused") == 3
        cpu = sb.run(
            "import resource, signal\n"
            "resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "while True:\n"
            "    pass"
        )
        assert cpu.error == "timeout" and cpu.duration_s < FAST.wall_s + 2  # the outside deadline holds


# ----------------------------------------------------------------------------- many at once


@pytest.mark.parametrize("backend", BOTH)
def test_sixty_four_sessions_at_once(backend):
    from sandbox_util import require

    from mathrl.sandbox import Sandbox, run_many

    require(backend)
    sessions = [Sandbox(FAST, backend=backend) for _ in range(64)]
    try:
        for sb in sessions:
            sb.start()
        results = run_many([(sb, f"print({i})") for i, sb in enumerate(sessions)])
        assert [r.output for r in results] == [f"{i}\n" for i in range(64)]
        assert all(r.error is None for r in results)
        pids = [p for sb in sessions for p in session_processes(sb)]
    finally:
        for sb in sessions:
            sb.close()
    time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_signals_to_the_test_process_never_arrive():
    """A run that signals every pid it can name (3..32767; 1 is bwrap's init, 2 the session itself)
    hits only its own."""
    hits = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: hits.append(a))
    try:
        with open_session("bwrap") as sb:
            sb.run(
                "import os, signal\n"
                "for pid in range(3, 32768):\n"
                "    try:\n"
                "        os.kill(pid, signal.SIGUSR1)\n"
                "    except OSError:\n"
                "        pass"
            )
        time.sleep(0.2)
        assert hits == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ----------------------------------------------------------------------------- the protocol and host metadata

_REPLY_FD = "import json, os, struct, sys\nfd = int(json.loads(sys.argv[1])['reply_fd'])\n"


def _frame(message: dict) -> str:
    return f"body = json.dumps({message!r}).encode()\nos.write(fd, struct.pack('<I', len(body)) + body)\n"


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize(
    "reply", [{"cell": "guess", "error": None, "threads": 0}, {"error": None, "threads": "many"}, {"ready": True}]
)
def test_a_cell_that_writes_its_own_reply_is_caught(backend, reply):
    with open_session(backend) as sb:
        sb.run("kept = 1")
        result = sb.run(_REPLY_FD + _frame(reply) + "import time\ntime.sleep(0.3)\n'the real end'")
        assert (result.error, result.state_lost) == ("sandbox", True)
        assert "reply" in result.output
        assert "NameError" in sb.run("kept").output  # a fresh session, not the confused one
        usable_after(sb)


@pytest.mark.parametrize("backend", BOTH)
def test_a_reply_flood_cannot_hold_the_parent(backend):
    with open_session(backend) as sb:
        rss = _rss_mb()
        code = (
            _REPLY_FD
            + "import signal\nfor s in (signal.SIGALRM, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\n"
            "tiny = struct.pack('<I', 1) + b'0'\nwhile True:\n    os.write(fd, tiny * 4096)"
        )
        result = sb.run(code)
        assert result.error in ("sandbox", "timeout") and result.state_lost
        assert result.duration_s < FAST.wall_s + 2
        assert _rss_mb() - rss < 100
        usable_after(sb)


def test_host_device_nodes_keep_their_metadata():
    """As root the session's uid maps to host root and the device nodes are the host's: the
    changes tried are no-ops (same mode, times, owner), so a regression fails this test without
    breaking the machine's /dev/null."""
    before = os.stat("/dev/null")
    mode, times = before.st_mode & 0o7777, (before.st_atime, before.st_mtime)
    with open_session("bwrap") as sb:
        result = sb.run(
            f"import os\nfor change in (lambda: os.chmod('/dev/null', {mode}),\n"
            f"               lambda: os.utime('/dev/null', {times}), lambda: os.chown('/dev/null', -1, -1)):\n"
            "    try:\n        change()\n        print('changed')\n    except OSError as e:\n        print(e.errno)"
        )
        assert result.output == "1\n1\n1\n"  # EPERM, three times
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns,
    )  # fmt: skip
