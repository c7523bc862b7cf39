"""Real GRPO runs of ``mathrl train``: two steps on the embedded model, SIGKILL + resume,
full fine-tuning of a local HF directory, and config errors from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Small but real: the embedded model on easy sums (mixed rewards, so updates happen). A fixed
# thread count: torch's default follows the CPUs a process may use, which a CI container can vary
# between processes, and a reduction split another way can flip a greedy near-tie (CI once saw the
# step-0 test score of two identical runs differ by one problem).
SMALL = [
    "group_size=4", "groups_per_batch=3", "max_tokens=6", "env_args.max_operand=9",
    "env_args.test_size=8", "eval_every=2", "micro_batch_tokens=200", "num_threads=2",
]  # fmt: skip


def _mathrl(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mathrl.cli", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mathrl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _deterministic(rows: list[dict]) -> list[dict]:
    """Drop wall-clock and memory readings: everything else must be reproduced."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


@pytest.mark.slow
def test_two_grpo_steps_on_the_embedded_model(tmp_path):
    run = tmp_path / "run"
    proc = _mathrl("train", *SMALL, "max_steps=2", "save_every=1", f"log_path={run}")
    assert "Warning" not in proc.stderr, proc.stderr  # the main job once printed a FutureWarning 7 times
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("env/all/reward/total", "env/all/correct", "env/all/ac_tokens_per_turn", "optim/lr",
                "env/all/by_group/frac_mixed", "time/sample", "time/train", "progress/batch"):  # fmt: skip
        assert key in rows[0] and key in rows[1], key
    assert "test/env/all/correct" in rows[0] and "test/env/all/correct" in rows[2]  # step 0 and after the end
    assert rows[0]["env/all/grader_timeouts"] == 0  # rewards came through mathrl.grading
    updated = [r for r in rows[:2] if r["optim/num_sequences"] > 0]
    assert updated, "no step had a mixed group: the test would not exercise an update"
    for r in updated:
        assert abs(r["optim/kl_sample_train_v1"]) < 0.05  # bf16 sampler vs trainer agree
        assert r["optim/entropy"] > 0 and r["optim/grad_norm"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["group_size"] == 4 and config["env_args"] == {"max_operand": 9, "test_size": 8}
    ckpts = [json.loads(line) for line in (run / "checkpoints.jsonl").read_text().splitlines()]
    assert [(c["step"], c["final"]) for c in ckpts] == [(1, False), (2, True)]
    assert (run / "plot.png").stat().st_size > 1000
    report = (run / "report.html").read_text()  # rewritten at each evaluation and at the end: all 3 rows
    points = dict(re.findall(r'<path class="series"[^>]* data-key="([^"]+)"[^>]* data-points="(\d+)"', report))
    assert points["env/all/correct"] == "2"  # steps 0 and 1
    assert points["test/env/all/correct"] == "2"  # step 0 and the final weights
    assert 'value="r0:train-1"' in report and 'value="r0:test-2"' in report  # the sample browser's steps
    rollouts = (run / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    assert len(rollouts) == 12 and "What is" in json.loads(rollouts[0])["prompt"]
    for row in map(json.loads, rollouts):  # what a sample was trained with, and why
        assert {"advantage", "answer", "reference", "reward", "completion"} <= row.keys()
        assert row["advantage"] is None or isinstance(row["advantage"], float)
    # The checkpoint is an ordinary peft adapter whose base is named by its hub id (it loads on any
    # machine); offline here, onto the local copy of that base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mathrl import EMBEDDED_HUB_ID
    from mathrl.models import ensure_embedded_model

    adapter = run / "checkpoints" / "step_000002"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ensure_embedded_model()), adapter)
    assert model.peft_config["default"].r == 32


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path):
    args = [*SMALL, "max_steps=5", "save_every=1"]
    straight = tmp_path / "straight"
    _mathrl("train", *args, f"log_path={straight}")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mathrl.cli", "train", *args, f"log_path={killed}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpts = killed / "checkpoints.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and len(ckpts.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    time.sleep(1.5)  # land somewhere inside the next step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _rows(killed)  # every row written before the kill is whole JSON
    assert 2 <= len(partial) < 6
    json.loads((killed / "config.json").read_text())
    last = json.loads(ckpts.read_text().splitlines()[-1])["step"]

    again = _mathrl("train", *args, f"log_path={killed}")
    assert f"resuming {killed} from its checkpoint at step {last}" in again.stdout  # it says so, and where
    resumed, reference = _deterministic(_rows(killed)), _deterministic(_rows(straight))
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(6))
    for got, want in zip(resumed, reference, strict=True):
        assert got.keys() == want.keys()
        for key in want:  # same seed on the CPU: identical up to float round-off
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    steps = [json.loads(line)["step"] for line in ckpts.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 5


@pytest.mark.slow
def test_full_finetuning_of_a_local_hf_directory(tmp_path):
    # The embedded model's converted cache is an ordinary local HF directory. A random tiny
    # model would never write a digit, so every reward would be 0 and no gradient would flow.
    from mathrl.models import ensure_embedded_model

    model_dir = ensure_embedded_model()
    run = tmp_path / "run"
    _mathrl(
        "train", f"model_name={model_dir}", "lora_rank=0", "max_steps=2", "group_size=4", "groups_per_batch=2",
        "max_tokens=4", "env_args.test_size=4", "env_args.max_operand=9", "remove_constant_reward_groups=false",
        f"log_path={run}",
    )  # fmt: skip
    rows = _rows(run)
    assert rows[0]["optim/num_sequences"] == 8 and rows[0]["optim/grad_norm"] > 0
    final = run / "checkpoints" / "step_000002"
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(final)
    original = LlamaForCausalLM.from_pretrained(model_dir)
    changed = [n for n, p in reloaded.named_parameters() if not p.equal(dict(original.named_parameters())[n])]
    assert changed, "full fine-tuning changed no weight"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["learning_rat=1e-4"], "Did you mean 'learning_rate'"),
        (["learning_rate=fast"], "learning_rate: expected a float"),
        (["loss_fn=grpo"], "loss_fn"),
        (["group_size=0"], "group_size: must be >= 1"),
        (["env=arithmatic"], "Did you mean 'arithmetic'"),
        (["env_args.max_operant=5"], "Did you mean 'env_args.max_operand'"),
        (["config=/nonexistent.yaml"], "/nonexistent.yaml"),
    ],
)
def test_config_errors_exit_2_with_a_clear_message(args, message, tmp_path):
    proc = _mathrl("train", *args, f"log_path={tmp_path / 'r'}", check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_key_with_its_default():
    from dataclasses import fields

    from mathrl.train.rl import TrainConfig

    out = _mathrl("train", "--help", timeout=120).stdout
    for f in fields(TrainConfig):
        assert f.name in out
    assert "env_args.max_operand" in out
    lr_line = next(line for line in out.splitlines() if line.strip().startswith("learning_rate "))
    assert str(TrainConfig().learning_rate) in lr_line
