"""Operational mistakes end in one line naming the key and the path, exit code 2, and leave
nothing behind (issue: a missing model path printed four chained hub tracebacks and left
config.json in log_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mathrl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mathrl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    ("command", "key", "missing"),
    [("train", "model_name", "/nonexistent/model"), ("sft", "model_name", "./no/such/model"),
     ("eval", "model", "/nonexistent/model")],
)  # fmt: skip
def test_a_missing_model_path_is_one_line_and_creates_nothing(tmp_path, command, key, missing):
    out = tmp_path / "run"
    extra = {
        "train": [f"log_path={out}"],
        "sft": [f"log_path={out}", f"train_file={tmp_path / 'traces.jsonl'}"],
        "eval": [f"output_dir={out}", "benchmarks=gsm8k", "limit=2", f"data_dir={ROOT.parent / 'shared' / 'data'}"],
    }[command]
    (tmp_path / "traces.jsonl").write_text("")
    result = _mathrl(command, f"{'model' if command == 'eval' else 'model_name'}={missing}", *extra)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"mathrl {command}: error: {key}: {missing} does not exist; " + lines[0].split("exist; ")[1]]
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("log_path", ["/dev/null/run", "/proc/forbidden/run"])
def test_an_impossible_log_path_is_named(log_path):
    result = _mathrl("train", f"log_path={log_path}", "max_steps=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"mathrl train: error: log_path: cannot create {log_path} (")


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_half_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)]).returncode:
        pytest.skip("needs root to mount a 4 MB tmpfs (a real full disk)")
    try:
        run = small / "run"
        result = _mathrl(
            "train", f"log_path={run}", "max_steps=2", "save_every=1", "group_size=2", "groups_per_batch=2",
            "max_tokens=4", "env_args.test_size=4", "eval_every=0", "save_rollouts=false",
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("mathrl train: error: no space left on device")
        assert not list((run / "checkpoints").glob("*.tmp")), "a half-written checkpoint was left behind"
        assert not (run / "checkpoints.jsonl").exists()  # nothing listed: the run restarts cleanly
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    finally:
        subprocess.run(["umount", str(small)])


@pytest.mark.parametrize("command", ["train", "sft", "eval", "distill", "traces", "serve"])
def test_help_does_not_import_torch(command):
    # --help took 4.5-7.9 s when the options lived next to the torch code; now it reads them alone.
    code = (
        "import sys; from mathrl.cli import main; main([sys.argv[1], '--help']); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'sympy') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-1000:]
    assert f"usage: mathrl {command}" in result.stdout


def test_unknown_command_suggests_the_closest_and_version_prints():
    result = _mathrl("trian")
    assert result.returncode == 2 and "did you mean `mathrl train`?" in result.stderr
    version = _mathrl("--version")
    assert version.returncode == 0 and version.stdout.startswith("mathrl ")


def test_an_unreachable_server_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _mathrl(
        "train", "sampler=remote", f"base_url=http://127.0.0.1:{port}/v1", "api_model=m", f"log_path={tmp_path / 'r'}",
        "max_steps=1",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mathrl train: error: GET http://127.0.0.1:") and "check base_url" in last
    assert not (tmp_path / "r").exists()  # checked before anything was created
