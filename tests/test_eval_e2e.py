"""Real runs of ``mathrl eval`` (embedded model, local benchmark files) and of
``mathrl train env=gsm8k`` with its periodic test evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout"),
    pytest.mark.slow,  # every test runs the embedded model
]


def _mathrl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mathrl.cli", *args], capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"mathrl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _no_seconds(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def _untimed(path: Path) -> list[dict]:
    return [_no_seconds(row) for row in _jsonl(path)]


def test_eval_writes_rows_summaries_and_an_ablation_table_and_resumes(tmp_path):
    out = tmp_path / "ev"
    common = [f"data_dir={SHARED}", "limit=3", "n=2", "temperature=0.8", "max_tokens=24", "dtype=fp32",
              f"output_dir={out}"]  # fmt: skip
    run = _mathrl("eval", "benchmarks=gsm8k,math500", "model=embedded:SmolLM2-135M-Instruct,"
                  "embedded:SmolLM2-135M-Instruct", "labels=base,again", *common)  # fmt: skip
    assert "| base |" in run.stdout and "| again |" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("|")]  # stdout is a pipe here
    assert len(table) >= 4 and all(line.endswith("|") for line in table)  # rows whole, not wrapped at 80
    assert max(len(line) for line in table) > 80  # (this table is wider than that)
    rows = _jsonl(out / "base" / "gsm8k.jsonl")
    assert [r["id"] for r in rows] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["prompt"][-1]["content"]  # what the model saw
    summary = json.loads((out / "base" / "gsm8k.summary.json").read_text())
    assert summary["model"] == "base" and summary["mathrl_version"] and "git_sha" in summary
    for row in rows:
        assert len(row["samples"]) == 2 and len(row["votes"]) == 2
        for sample in row["samples"]:
            assert set(sample) >= {"text", "answer", "correct", "tokens", "finish_reason"}
            assert 0 < sample["tokens"] <= 24
    summary = json.loads((out / "base" / "gsm8k.summary.json").read_text())
    pass1 = sum(sum(r["correct"]) / 2 for r in rows) / 3
    assert summary["pass1"] == pytest.approx(pass1)
    assert summary["pass1_low"] <= pass1 <= summary["pass1_high"]
    assert set(summary["pass_at"]) == {"1", "2"} and set(summary["maj_at"]) == {"1", "2"}
    truncated = sum(s["finish_reason"] == "length" for r in rows for s in r["samples"]) / 6
    assert summary["truncation_rate"] == pytest.approx(truncated)
    # same model, same seed: the two rows of the table agree
    assert _untimed(out / "again" / "math500.jsonl") == _untimed(out / "base" / "math500.jsonl")
    table = json.loads((out / "ablation.json").read_text())
    assert set(table) == {"base", "again"} and [s["benchmark"] for s in table["base"]] == ["gsm8k", "math500"]
    assert (out / "ablation.csv").read_text().count("\n") == 1 + 4
    assert "95% confidence interval" in (out / "ablation.md").read_text()

    # resume: drop the last problem's row; the rerun regenerates only it, identically
    path = out / "base" / "math500.jsonl"
    before = path.read_text().splitlines()
    path.write_text("\n".join(before[:-1]) + "\n")
    _mathrl("eval", "benchmarks=math500", "labels=base", *common)
    after = path.read_text().splitlines()
    assert len(after) == 3 and after[:2] == before[:2]  # the first two were read back, not redone
    assert _untimed(path) == [_no_seconds(json.loads(line)) for line in before]

    changed_args = [a.replace("max_tokens=24", "max_tokens=32") for a in common]
    changed = _mathrl("eval", "benchmarks=math500", "labels=base", *changed_args, check=False)
    assert changed.returncode == 2 and "max_tokens: 24 -> 32" in changed.stderr

    # another grader: refused on the same rows unless they are all graded again
    other = _mathrl("eval", "benchmarks=math500", "labels=base", *common, "grader=math_verify", check=False)
    assert other.returncode == 2 and "grader: 'mathrl' -> 'math_verify'" in other.stderr
    assert "regrade=true" in other.stderr and _untimed(path) == [_no_seconds(json.loads(line)) for line in before]
    _mathrl("eval", "benchmarks=math500", "labels=base", *common, "grader=math_verify", "regrade=true")
    assert json.loads((out / "base" / "math500.settings.json").read_text())["grader"] == "math_verify"
    assert [r["samples"][0]["text"] for r in _jsonl(path)] == [json.loads(b)["samples"][0]["text"] for b in before]


def test_train_on_gsm8k_with_periodic_test_evaluation(tmp_path):
    run = tmp_path / "gsm"
    _mathrl(
        "train", "env=gsm8k", f"env_args.data_dir={SHARED}", "env_args.test_limit=4", "env_args.limit=16",
        "group_size=2", "groups_per_batch=2", "max_tokens=24", "max_steps=2", "eval_every=1", "eval_n=2",
        "eval_temperature=0.7", "micro_batch_tokens=300", f"log_path={run}",
    )  # fmt: skip
    rows = _jsonl(run / "metrics.jsonl")
    tested = [r for r in rows if "test/env/all/correct" in r]
    assert [r["step"] for r in tested] == [0, 1, 2]  # every step, and the final weights
    for r in tested:
        assert 0 <= r["test/pass@1/ci_low"] <= r["test/env/all/correct"] <= r["test/pass@1/ci_high"] <= 1
        assert "test/pass@2" in r and "test/maj@2" in r
    evals = _jsonl(run / "eval" / "step_000002.jsonl")
    assert len(evals) == 4 and all(len(r["samples"]) == 2 for r in evals)
    assert "env/all/reward/total" in rows[0] and rows[0]["env/all/grader_timeouts"] == 0


def _samples(path: Path) -> list[list[dict]]:
    keys = ("text", "answer", "correct", "tokens", "finish_reason")
    return [[{k: s[k] for k in keys} for s in row["samples"]] for row in _jsonl(path)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_eval_through_mathrl_serve_matches_the_local_backend(tmp_path):
    """A real HTTP server on loopback: same per-problem samples as running the model here."""
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mathrl.cli", "serve", f"port={port}", "served_model_name=smol"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else "server died"
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        common = [f"data_dir={SHARED}", "benchmarks=gsm8k", "limit=4", "max_tokens=32", "labels=x", "dtype=fp32"]
        for sampling in (["temperature=0"], ["temperature=0.8", "n=2", "seed=5"]):
            local, remote = tmp_path / f"local{len(sampling)}", tmp_path / f"remote{len(sampling)}"
            _mathrl("eval", *common, *sampling, f"output_dir={local}")
            _mathrl("eval", *common, *sampling, f"output_dir={remote}", f"base_url=http://127.0.0.1:{port}/v1",
                    "api_model=smol", "concurrency=4")  # fmt: skip
            assert _samples(remote / "x" / "gsm8k.jsonl") == _samples(local / "x" / "gsm8k.jsonl"), sampling
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_eval_reads_a_lora_checkpoint_and_a_run_directory(tmp_path):
    """RL run -> its LoRA checkpoint merged for inference; a run dir means its latest checkpoint."""
    run = tmp_path / "rl"
    _mathrl("train", "max_steps=1", "group_size=4", "groups_per_batch=2", "max_tokens=6", "env_args.max_operand=9",
            "env_args.test_size=8", "eval_every=0", f"log_path={run}")  # fmt: skip
    checkpoint = run / "checkpoints" / "step_000001"
    assert (checkpoint / "adapter_config.json").exists()
    bench = tmp_path / "sums.jsonl"
    bench.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
                             for i in range(4)))  # fmt: skip
    out = tmp_path / "ev"
    result = _mathrl("eval", f"benchmarks={bench}", f"model=embedded:SmolLM2-135M-Instruct,{checkpoint},{run}",
                     "labels=base,ckpt,run", "max_tokens=8", "style=gsm8k", "suffix=", f"output_dir={out}")  # fmt: skip
    table = json.loads((out / "ablation.json").read_text())
    assert list(table) == ["base", "ckpt", "run"], result.stdout
    # the run directory resolves to the same (latest) checkpoint: same greedy answers
    assert _untimed(out / "run" / "sums.jsonl") == _untimed(out / "ckpt" / "sums.jsonl")
