"""mathrl.sandbox: the interface, the session semantics and the output cap (both backends).

The attacks are in test_sandbox_attacks.py; this file checks that honest code gets what a
notebook would give it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time

import pytest
from sandbox_util import FAST, infrastructure, open_session, require, session_processes

from mathrl.sandbox import CHOICES, ERROR_KINDS, ExecResult, Sandbox, SandboxError, SandboxLimits, run_many
from mathrl.sandbox.output import OutputCap
from mathrl.workers import Decoder, ProtocolError, encode

BACKENDS = ["bwrap", "rlimit"]


def test_the_interface_is_exactly_the_one_other_code_calls():
    limits = SandboxLimits(
        cpu_s=5, wall_s=10, memory_mb=512, max_procs=64, max_file_mb=16, tmp_mb=32, max_output_chars=4000
    )
    assert limits == SandboxLimits()  # every limit has a default, and these are they
    assert [f.name for f in dataclasses.fields(ExecResult)] == ["output", "error", "state_lost", "duration_s"]
    assert ERROR_KINDS == ("syntax", "runtime", "timeout", "memory", "output_limit", "sandbox")
    assert CHOICES == ("auto", "bwrap", "rlimit")
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(SandboxError, match="unknown sandbox backend 'docker'"):
        Sandbox(backend="docker")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_survives_and_a_trailing_expression_is_shown(backend):
    with open_session(backend) as sb:
        first = sb.run("x = 6*7\nprint(x)")
        assert (first.output, first.error, first.state_lost) == ("42\n", None, False)
        assert sb.run("x + 1").output == "43\n"
        assert sb.run("y = x\nNone").output == ""  # None is not shown
        assert sb.run("def f(n):\n    return n * y\nf(2)").output == "84\n"
        assert sb.run("'a' + 'b'").output == "'ab'\n"  # repr, as in a notebook
        assert sb.run("import math\nmath.factorial(20)").output == "2432902008176640000\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_and_sympy_import_inside(backend):
    with open_session(backend, dataclasses.replace(FAST, wall_s=20, cpu_s=20)) as sb:
        result = sb.run("import numpy as np, sympy as sp\nprint(np.arange(4).sum(), sp.factor(sp.Symbol('x')**2 - 1))")
        assert (result.output, result.error) == ("6 (x - 1)*(x + 1)\n", None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_are_classified_and_shown_like_a_traceback(backend):
    with open_session(backend) as sb:
        syntax = sb.run("def f(:\n    pass")
        assert syntax.error == "syntax" and "SyntaxError" in syntax.output and "<cell 1>" in syntax.output
        runtime = sb.run("a = 1\nb = [1, 2][a + 5]")
        assert runtime.error == "runtime"
        assert 'File "<cell 2>", line 2' in runtime.output and "b = [1, 2][a + 5]" in runtime.output
        assert runtime.output.rstrip().endswith("IndexError: list index out of range")
        assert "repl.py" not in runtime.output  # the session's own frames are not shown
        assert sb.run("a").output == "1\n"  # the failing cell's earlier statements took effect
        assert sb.run("raise KeyboardInterrupt").error == "runtime"
        assert sb.run("import sys; sys.exit(0)").error is None
        assert sb.run("import sys; sys.exit(3)").output == "SystemExit: 3\n"
        assert sb.run("a + 1").output == "2\n"  # sys.exit does not end the session


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdout_and_stderr_interleave_as_written_including_child_processes(backend):
    with open_session(backend) as sb:
        code = (
            "import sys, subprocess\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')\n"
            "subprocess.run([sys.executable, '-c', 'import sys; print(1); print(2, file=sys.stderr)'])\n"
            "sys.stderr.write('d\\n')"
        )
        result = sb.run(code)
        assert result.output == "a\nb\nc\n1\n2\nd\n2\n"  # the last 2: write()'s return value, shown
        assert result.error is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_capped_keeping_head_and_tail_with_a_count_of_what_was_cut(backend):
    with open_session(backend) as sb:
        result = sb.run("print('<' + 'x' * 20000 + '>')")
        assert result.error is None and not result.state_lost
        assert len(result.output) <= FAST.max_output_chars
        assert result.output.startswith("<xxx") and result.output.endswith("xxx>\n")
        assert _cut(result.output) == 20003  # exactly what is not shown


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_soft_timeout_keeps_the_session_and_a_hard_one_restarts_it(backend):
    with open_session(backend) as sb:
        sb.run("kept = 'yes'")
        loop = sb.run("while True:\n    pass")
        assert (loop.error, loop.state_lost) == ("timeout", False)
        assert "CPU time limit (1 s)" in loop.output
        assert sb.run("kept").output == "'yes'\n"
        sleep = sb.run("import time\ntime.sleep(30)")
        assert (sleep.error, sleep.state_lost) == ("timeout", False)
        assert "wall-clock time limit (2 s)" in sleep.output and sleep.duration_s < 3
        stuck = sb.run("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nimport time\ntime.sleep(30)")
        assert (stuck.error, stuck.state_lost) == ("timeout", True)
        assert "session was restarted" in stuck.output
        assert 2.9 < stuck.duration_s < 5
        fresh = sb.run("kept")
        assert fresh.error == "runtime" and "NameError" in fresh.output and not fresh.state_lost


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_killed_between_runs_is_restarted_and_says_so(backend):
    with open_session(backend) as sb:
        sb.run("v = 1")
        repl = sb._launched.repl_pid()
        os.kill(repl, signal.SIGKILL)
        time.sleep(0.2)
        result = sb.run("v")
        assert result.state_lost and "NameError" in result.output
        assert sb.run("v = 2\nv").output == "2\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_a_run_starts_are_gone_when_it_returns(backend):
    with open_session(backend) as sb:
        result = sb.run(
            "import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\nq = 5"
        )
        assert result.error is None
        assert len(session_processes(sb)) == infrastructure(sb)  # the sleeper was killed
        assert sb.run("q").output == "5\n"  # and the session kept its state


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_sessions_run_at_once_and_one_slow_cell_does_not_hold_the_others(backend):
    require(backend)
    sessions = [Sandbox(FAST, backend=backend) for _ in range(16)]
    try:
        for sb in sessions:
            sb.start()
        codes = ["import time\ntime.sleep(1.5)\n'slow'"] + [f"{i} * {i}" for i in range(1, 16)]
        results = run_many(list(zip(sessions, codes, strict=True)))
        assert results[0].output == "'slow'\n"
        assert [r.output for r in results[1:]] == [f"{i * i}\n" for i in range(1, 16)]
        assert max(r.duration_s for r in results[1:]) < 1.4
    finally:
        for sb in sessions:
            sb.close()
    with pytest.raises(ValueError, match="appears twice"):
        run_many([(sessions[0], "1"), (sessions[0], "2")])


def test_the_isolation_says_what_isolates_the_session():
    require("bwrap")
    with open_session("bwrap") as sb:
        parts = sb.isolation.split("+")
        assert parts[0] == "bwrap" and set(parts[1:]) <= {"cgroup", "seccomp"}
    with open_session("rlimit") as sb:
        assert sb.isolation == "rlimit"


def test_a_missing_package_is_one_clear_error():
    with pytest.raises(SandboxError, match="'no_such_pkg_xyz' is not installed"):
        Sandbox(FAST, backend="rlimit", packages=("no_such_pkg_xyz",)).start()


def test_output_cap_keeps_head_and_tail_and_escapes_what_is_not_text():
    cap = OutputCap(max_chars=100, flood_bytes=1 << 20)
    for i in range(1000):
        cap.feed(f"{i:04d}\n".encode())
    text = cap.text()
    assert len(text) <= 100
    assert text.startswith("0000\n0001\n") and text.endswith("0998\n0999\n")
    assert _cut(text) == 5000
    small = OutputCap(max_chars=100, flood_bytes=1 << 20)
    small.feed(b"a\x00b\xffc\xe2\x82")  # NUL, an invalid byte, a character cut in two ...
    small.feed(b"\xac!")  # ... and completed by the next chunk
    assert small.text() == "a\\x00b\\xffc\u20ac!"
    flood = OutputCap(max_chars=100, flood_bytes=1000)
    flood.feed(b"x" * 1001)
    assert flood.flooded


def _cut(text: str) -> int:
    """Characters not shown + characters shown (without the marker): the whole output's length."""
    marker = re.search(r"\n\[\.\.\. (\d+) characters cut \.\.\.\]\n", text)
    assert marker is not None, text
    return int(marker.group(1)) + len(text) - len(marker.group(0))


def test_messages_survive_any_string_and_a_lying_worker_cannot_make_the_parent_buffer_without_end():
    decoder = Decoder(limit=1000)
    message = {"code": "print('\u00e9\ud800\x00')"}  # a lone surrogate and NUL: JSON escapes both
    data = encode(message)
    assert decoder.feed(data[:3]) == [] and decoder.feed(data[3:]) == [message]
    with pytest.raises(ProtocolError, match="limit"):
        Decoder(limit=1000).feed(b"\xff\xff\xff\x7f")
    with pytest.raises(ProtocolError, match="not JSON"):
        Decoder(limit=1000).feed(b"\x03\x00\x00\x00abc")
