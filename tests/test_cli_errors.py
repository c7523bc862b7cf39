"""Operational mistakes end in one line naming the key and the path, exit code 2, and leave
nothing behind (issue: a missing model path printed four chained hub tracebacks and left
config.json in log_path)."""

from __future__ import annotations

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
