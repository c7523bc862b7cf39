"""Each loss, aggregation and DAPO option of issue 15 runs a real ``mathrl train`` step on the
embedded model (three runs cover them all, to keep the suite short)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "group_size=4", "groups_per_batch=3", "max_tokens=6", "env_args.max_operand=9", "env_args.test_size=8",
    "eval_every=0", "max_steps=1", "num_threads=2", "save_rollouts=true",
]  # fmt: skip

# cispo runs with ppo_clip_high (its upper bound, as DAPO's clip-higher is ppo's); ppo's
# asymmetric clipping is checked in the update itself by tests/test_losses.py and tests/test_update.py.
RUNS = {
    "cispo": [
        "loss_fn=cispo",
        "ppo_clip_high=0.28",
        "loss_agg=token_sum_norm",
        "overlong_filter=true",
        "grader=math_verify",
    ],
    "gspo": [
        "loss_fn=gspo",
        "loss_agg=seq_mean",
        "overlong_buffer=2",
        "overlong_penalty=0.5",
        "dynamic_sampling=true",
        "dynamic_sampling_max_draws=2",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_one_training_step_per_loss_and_option(name, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mathrl.cli", "train", *SMALL, *RUNS[name], f"log_path={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((run / "config.json").read_text())
    for item in RUNS[name]:
        key, value = item.split("=")
        assert str(config[key]).lower() == value, key  # the option reached the run
    step0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    rollouts = [json.loads(line) for line in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    if name == "gspo":  # dynamic sampling: logged, and the batch holds only groups with spread
        assert step0["dynamic_sampling/groups_sampled"] == 3 * (1 + step0["dynamic_sampling/extra_draws"])
        assert step0["dynamic_sampling/groups_kept"] == 3 or step0["dynamic_sampling/extra_draws"] == 2
        assert all(r["advantage"] is not None for r in rollouts)
    assert step0["optim/num_sequences"] > 0, "no mixed group: the loss was not exercised"
    assert math.isfinite(step0["optim/loss"]) and step0["optim/grad_norm"] > 0
    if name == "cispo":  # overlong filtering: truncated answers are not trained on
        trained = sum(r["advantage"] is not None and r["finish_reason"] != "length" for r in rollouts)
        assert step0["optim/num_sequences"] == trained
    assert (Path(run) / "eval" / "step_000001.jsonl").exists()
