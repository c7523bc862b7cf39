"""Data-parallel training under torchrun (2 CPU processes, gloo).

- The update equals one process's on the same global batch, for DDP and FSDP2, GRPO and SFT,
  LoRA and full fine-tuning (tests/dist_update.py runs the real ``_update`` / ``train_step``).
- ``torchrun -m mathrl train``: rank 0 alone writes, the run resumes on every rank, its
  metrics equal a one-process run's, and a rank that dies ends the job instead of hanging.
"""

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
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_update.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
EMBEDDED = "embedded:SmolLM2-135M-Instruct"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


CASES = [("rl", "ddp", "4"), ("rl", "fsdp", "4"), ("rl", "fsdp", "0"), ("sft", "ddp", "4"), ("sft", "fsdp", "0")]


@pytest.fixture(scope="module")
def updates(tmp_path_factory) -> dict[tuple[str, str, str, int], dict[str, object]]:
    """Every case's result in 1 process and in 2 (one launch each: startup is most of the cost)."""
    out = tmp_path_factory.mktemp("updates")
    one_cases = sorted({f"{kind}:ddp:{lora}" for kind, _, lora in CASES})
    (out / "one").mkdir()
    (out / "two").mkdir()
    _run([sys.executable, str(SCRIPT), str(out / "one"), *one_cases])
    _run([*TORCHRUN, str(SCRIPT), str(out / "two"), *(":".join(c) for c in CASES)])
    results = {}
    for kind, mode, lora in CASES:
        results[kind, mode, lora, 1] = torch.load(out / "one" / f"{kind}-ddp-{lora}.pt")
        results[kind, mode, lora, 2] = torch.load(out / "two" / f"{kind}-{mode}-{lora}.pt")
    return results


@pytest.mark.parametrize(("kind", "mode", "lora"), CASES)
def test_two_ranks_update_equals_one_process(updates, kind, mode, lora):
    one, two = updates[kind, mode, lora, 1], updates[kind, mode, lora, 2]
    w1, w2, w0 = one["weights"], two["weights"], one["initial"]
    assert isinstance(w1, dict) and isinstance(w2, dict) and isinstance(w0, dict)
    assert w1.keys() == w2.keys()
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
    gap = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 1e-4  # the update is real: the tolerance below is far under it
    assert gap < 5e-6, f"2-rank {mode} update differs from 1 process by {gap:.2e} (update size {moved:.2e})"
    s1, s2 = one["stats"], two["stats"]
    assert isinstance(s1, dict) and isinstance(s2, dict)
    for key in s1:  # losses, KL, entropy, clipping: summed over ranks, equal to one process's
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), key


# --- torchrun -m mathrl train --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir) -> Path:
    """A tiny random Llama with the embedded model's tokenizer and chat template."""
    return tiny_llama_dir("tiny")


def _train_args(model: Path | str, log_path: Path, *extra: str) -> list[str]:
    return [
        "-m", "mathrl", "train", f"model_name={model}", f"log_path={log_path}", "group_size=4",
        "groups_per_batch=4", "max_tokens=6", "env_args.max_operand=9", "env_args.test_size=8", "eval_every=0",
        "save_every=1", "train_bf16=false", "sample_dtype=float32", "temperature=1.0", "num_threads=1",
        "learning_rate=1e-2", *extra,
    ]  # fmt: skip


def _rows(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = (
    "env/all/reward/total",
    "optim/num_sequences",
    "optim/entropy",
    "optim/kl_sample_train_v1",
    "optim/loss",
)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """3 steps in one process. The embedded model gets some answers right, so groups have reward
    spread and train."""
    one = tmp_path_factory.mktemp("one") / "run"
    _run([sys.executable, *_train_args(EMBEDDED, one, "max_steps=3")])
    return one


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_train_writes_once_resumes_and_matches_one_process(one_process_run, tmp_path, mode):
    one = one_process_run
    two = tmp_path / "two"
    _run([*TORCHRUN, *_train_args(EMBEDDED, two, "max_steps=2", f"parallel={mode}")])
    rows = _rows(two)
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone logs: each step once
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    if mode == "fsdp":  # each rank's optimizer shard sits beside the gathered weights
        assert {p.name for p in (two / "checkpoints" / "step_000002").glob("optimizer_rank*")} == {
            "optimizer_rank000.pt", "optimizer_rank001.pt"
        }  # fmt: skip
    resumed = _run([*TORCHRUN, *_train_args(EMBEDDED, two, "max_steps=3", f"parallel={mode}")])
    assert "from its checkpoint at step 2" in resumed.stdout
    rows = _rows(two)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # Same seed: rank 0 samples what the single process samples, the update is the same.
    for got, want in zip(rows[:3], _rows(one)[:3], strict=True):
        for key in DETERMINISTIC:
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (got["step"], key)
    assert sum("optim/loss" in r for r in rows) >= 2  # steps did train


def _start_and_wait_for_a_step(tiny_dir: Path, run: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*TORCHRUN, *_train_args(tiny_dir, run, "max_steps=200")],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and _rows(run)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    return proc


def _rank_pid(proc: subprocess.Popen[str], rank: int) -> int:
    pids = [pid for pid in _descendants(proc.pid) if _environ(pid).get("RANK") == str(rank)]
    assert pids, f"no rank-{rank} worker found"
    return pids[0]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job(tiny_dir, tmp_path):
    proc = _start_and_wait_for_a_step(tiny_dir, tmp_path / "dies")
    try:
        os.kill(_rank_pid(proc, 1), signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - t0 < 60  # no hang in a collective
        assert "rank      : 1" in err and "Signal 9" in err  # torchrun names the dead rank and why
        # One line from rank 0, whichever came first: its collective failed or torchrun stopped it
        # (CI once caught rank 0 importing its error path when torchrun's SIGTERM came).
        line = r"mathrl train: error: rank 0 (lost contact with another rank|was stopped \(stopped by signal SIGTERM)"
        assert re.search(line, err), err[-3000:]
        assert "[rank0]: Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_rank_stopped_by_sigterm_says_so_in_one_line(tiny_dir, tmp_path):
    # What torchrun sends the survivors when a rank fails, or every rank when the job is interrupted.
    proc = _start_and_wait_for_a_step(tiny_dir, tmp_path / "stopped")
    try:
        os.kill(_rank_pid(proc, 0), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "mathrl train: error: rank 0 was stopped (stopped by signal SIGTERM" in err, err[-3000:]
        assert "[rank0]: Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[0::2], out[1::2], strict=True):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_gradient_checkpointing_gives_the_same_update(tiny_model):
    """gradient_checkpointing=true recomputes activations and drops the prompt sharing (the cache
    cannot survive a recomputation): the update must not change."""
    import copy
    from dataclasses import replace

    from mathrl import parallel
    from mathrl.models import trained_weights, wrap_lora
    from mathrl.rl.batching import ActionScorer, Datum, collate
    from mathrl.train.rl import TrainConfig, _update, share_prefix
    from mathrl.train.run import make_optimizer

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 97, (6,), generator=g).tolist()
    datums = [
        Datum((*prompt, 10 + i, 20 + i, 30), (False,) * 6 + (True,) * 3, (0.0,) * 6 + (-1.0, -2.0, -0.5),
              float(i) - 1.5)
        for i in range(4)
    ]  # fmt: skip
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = copy.deepcopy(tiny_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy = wrap_lora(model, 4)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        cfg = replace(TrainConfig(), learning_rate=1e-3, train_bf16=False, gradient_checkpointing=checkpointing)
        optimizer, scheduler = make_optimizer(policy, cfg, 1)
        initial = {k: v.detach().clone() for k, v in trained_weights(policy).items()}
        batch = collate(datums, 0, share_prefix=share_prefix(cfg, parallel.World()))
        assert (batch.prefix_ids_PL.shape[1] == 0) == checkpointing  # no prompt sharing under checkpointing
        _update(ActionScorer(policy), policy, None, optimizer, scheduler, batch, cfg, torch.device("cpu"))
        results.append({k: v.detach().clone() for k, v in trained_weights(policy).items()})
    plain, recomputed = results
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 1e-4  # a real update
    assert max(float((plain[k] - recomputed[k]).abs().max()) for k in plain) < 1e-6
