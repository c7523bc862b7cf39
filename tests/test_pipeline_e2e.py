"""The whole seed pipeline from the command line, on the CPU with the embedded model:
``mathrl serve`` (the teacher) -> ``mathrl distill`` -> ``mathrl traces`` -> ``mathrl sft``
-> ``mathrl train load_checkpoint_path=<sft run>`` -> ``mathrl eval`` of both checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout"),
]


def _mathrl(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mathrl.cli", *args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"mathrl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _serve(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mathrl.cli", "serve", f"port={port}", "served_model_name=teacher"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert server.poll() is None, server.stderr.read() if server.stderr else "server died"
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)


def test_serve_distill_sft_rl_eval(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    sums = tmp_path / "sums.jsonl"  # problems even the 135M teacher sometimes gets right
    sums.write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
        for i, (a, b) in enumerate([(1, 1), (2, 2), (3, 4), (5, 5), (2, 3), (1, 6)])
    ))  # fmt: skip

    # 1. the teacher behind a real OpenAI-compatible server; distill a handful of problems
    server = _serve(port)
    try:
        _mathrl(
            "distill", f"datasets={sums}", "n=2", "max_tokens=16", "temperature=0.3", "seed=1", "suffix= ",
            "style=last_number", f"base_url=http://127.0.0.1:{port}/v1", "api_model=teacher", "labels=teacher",
            f"output_dir={tmp_path / 'distill'}",
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    samples = _jsonl(tmp_path / "distill" / "teacher" / "sums.jsonl")
    assert len(samples) == 6 and all(len(r["samples"]) == 2 for r in samples)
    distilled = _jsonl(tmp_path / "distill" / "traces.jsonl")
    correct = [s for r in samples for s in r["samples"] if s["correct"] and s["finish_reason"] == "stop"]
    assert len(distilled) == len(correct)
    assert all(t["source"] == "teacher" and t["messages"][-1]["role"] == "assistant" for t in distilled)

    # 2. the distilled traces plus reference solutions (so there is data whatever the teacher got right)
    _mathrl("traces", "from_dataset=gsm8k", f"data_dir={SHARED}", "limit=16", "max_tokens=160",
            f"output={tmp_path / 'ref.jsonl'}")  # fmt: skip
    _mathrl("traces", f"inputs={tmp_path / 'distill' / 'traces.jsonl'},{tmp_path / 'ref.jsonl'}",
            f"output={tmp_path / 'sft.jsonl'}", "seed=0")  # fmt: skip
    combined = _jsonl(tmp_path / "sft.jsonl")
    everything = distilled + _jsonl(tmp_path / "ref.jsonl")  # exact duplicates (same reply twice) go
    assert len(combined) == len({(t["problem_id"], json.dumps(t["messages"])) for t in everything})
    assert {t["source"] for t in combined} == {t["source"] for t in everything}

    # 3. one short SFT epoch
    sft = tmp_path / "sft"
    _mathrl("sft", f"train_file={tmp_path / 'sft.jsonl'}", "num_epochs=1", "batch_size=4", "max_length=256",
            "lora_rank=8", "test_fraction=0.2", "eval_every=100", f"log_path={sft}")  # fmt: skip
    rows = _jsonl(sft / "metrics.jsonl")
    assert any("train_mean_nll" in r for r in rows) and "test/nll" in rows[-1]
    assert _jsonl(sft / "checkpoints.jsonl")[-1]["final"]

    # 4. two RL steps starting from the SFT weights
    rl = tmp_path / "rl"
    _mathrl("train", f"load_checkpoint_path={sft}", "max_steps=2", "group_size=4", "groups_per_batch=2",
            "max_tokens=8", "env_args.max_operand=9", "env_args.test_size=8", "eval_every=0", "lora_rank=8",
            f"log_path={rl}")  # fmt: skip
    config = json.loads((rl / "config.json").read_text())
    assert Path(config["load_checkpoint_path"]).parent.parent == sft.resolve()
    assert [r["step"] for r in _jsonl(rl / "metrics.jsonl") if "time/step" in r] == [0, 1]

    # 5. both checkpoints in one ablation table
    out = tmp_path / "eval"
    run = _mathrl("eval", f"model={sft},{rl}", "labels=sft,rl", "benchmarks=gsm8k", f"data_dir={SHARED}",
                  "limit=2", "max_tokens=16", f"output_dir={out}")  # fmt: skip
    assert "| sft |" in run.stdout and "| rl |" in run.stdout
    table = json.loads((out / "ablation.json").read_text())
    assert set(table) == {"sft", "rl"}
