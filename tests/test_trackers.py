"""Trackers (``tensorboard_dir=``, ``wandb_project=``): what they receive is read back from their
own files and compared with metrics.jsonl, key by key and step by step; a resumed run continues
them without duplicated steps; a missing package is one line before anything is created.

wandb runs offline (``WANDB_MODE=offline``: no network); its ``.wandb`` file is read with the
LevelDB log framing it uses and wandb's own protobuf records."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mathrl.config import ConfigError
from mathrl.tracking import MetricsLogger, closes_trackers, open_trackers, read_jsonl
from mathrl.train.configs import SFTConfig, TrainConfig

pytest.importorskip("tensorboard", reason="the tracker tests need tensorboard: pip install -e '.[dev]'")


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch, tmp_path):
    """wandb never reaches the network, nor writes outside the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def _needs_wandb() -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[dev]' or '.[wandb]')")


# --- reading the trackers' files back --------------------------------------------------------


def jsonl_by_step(log_path: Path) -> dict[int, dict[str, Any]]:
    rows = read_jsonl(log_path / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}


def tensorboard_by_step(directory: Path) -> dict[int, dict[str, float]]:
    """Every scalar TensorBoard's reader shows (after its purge of redone steps), by step."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(directory), size_guidance={"tensors": 0})  # 0: keep every event
    acc.Reload()
    rows: dict[int, dict[str, float]] = defaultdict(dict)
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            for event in acc.Tensors(tag):
                rows[event.step][tag] = make_ndarray(event.tensor_proto).item()
    return dict(rows)


def tensorboard_config(directory: Path) -> dict[str, Any]:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    acc.Reload()
    text = make_ndarray(acc.Tensors("config/text_summary")[-1].tensor_proto).item().decode()
    return json.loads(text)  # an indented Markdown code block is still JSON


def wandb_records(offline_dir: Path) -> list[Any]:
    """The protobuf records of an offline run's ``run-<id>.wandb``: a 7-byte header, then
    LevelDB log records (checksum, length, type) in 32 KiB blocks, a record split across blocks
    as FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2

    data = next(offline_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer too short for a header is zero padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _finished_records(offline_dir: Path, timeout: float = 60) -> list[Any]:
    """The records once wandb has written the run's exit record: ``run.finish()`` can return
    (wandb 0.31, offline) before wandb's service process has written the file out."""
    deadline = time.time() + timeout
    while True:
        records = wandb_records(offline_dir)
        if any(r.HasField("exit") for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def wandb_runs(log_path: Path) -> list[dict[str, Any]]:
    """Each offline run directory under ``log_path/wandb`` (a resume makes one more), in the
    order they started: its run id, history by step (wandb's own ``_`` keys left out), config and exit code."""
    runs = []
    for offline_dir in (log_path / "wandb").glob("offline-run-*"):
        records = _finished_records(offline_dir)
        start = next(r.run.start_time.ToNanoseconds() for r in records if r.HasField("run"))
        history = {}
        for r in (r for r in records if r.HasField("history")):
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
        run_id = next(r.run.run_id for r in records if r.HasField("run"))
        exits = [r.exit.exit_code for r in records if r.HasField("exit")]
        runs.append({"id": run_id, "history": history, "config": config, "exit": exits, "start": start})
    return sorted(runs, key=lambda run: run["start"])


def as_float32(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, float]]:
    """The values as TensorBoard keeps scalars: float32."""
    return {step: {k: float(np.float32(v)) for k, v in row.items()} for step, row in rows.items()}


def assert_same_rows(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        assert got[step].keys() == row.keys(), step
        for key, value in row.items():
            assert got[step][key] == value or (math.isnan(got[step][key]) and math.isnan(value)), (step, key)


# --- the logger's fan-out, no model ------------------------------------------------------------

ROWS = [
    {"env/all/correct": 0.25, "optim/lr": 1e-3, "time/total": 12345.678901234, "progress/batch": 0},
    {"env/all/correct": 1 / 3, "optim/lr": 9e-4, "time/total": 12346.5, "progress/batch": 1, "test/x": float("nan")},
    {"env/all/correct": 0.5, "optim/lr": 8e-4, "time/total": 12347.25, "progress/batch": 2},
]


def _run_dir(tmp_path: Path, name: str, **options: str) -> tuple[TrainConfig, Path]:
    log_path = tmp_path / name
    log_path.mkdir()
    cfg = TrainConfig(log_path=str(log_path), **options)  # type: ignore[arg-type]
    (log_path / "config.json").write_text(json.dumps({"log_path": str(log_path), "seed": 7, "env_args": {"a": 1}}))
    return cfg, log_path


def _log(cfg: TrainConfig, log_path: Path, start_step: int, rows: list[dict[str, float]]) -> MetricsLogger:
    logger = MetricsLogger(log_path, open_trackers(cfg, log_path, start_step))
    for step, row in enumerate(rows, start_step):
        logger.log(step, row)
    return logger


def test_tensorboard_holds_every_metrics_jsonl_key_value_and_step(tmp_path):
    cfg, log_path = _run_dir(tmp_path, "run", tensorboard_dir=str(tmp_path / "tb"))
    _log(cfg, log_path, 0, ROWS).close()
    assert_same_rows(tensorboard_by_step(tmp_path / "tb"), as_float32(jsonl_by_step(log_path)))
    assert tensorboard_config(tmp_path / "tb") == {"log_path": str(log_path), "seed": 7, "env_args": {"a": 1}}


def test_tensorboard_resume_hides_the_redone_steps_of_the_earlier_file(tmp_path):
    cfg, log_path = _run_dir(tmp_path, "run", tensorboard_dir=str(tmp_path / "tb"))
    _log(cfg, log_path, 0, ROWS).close(failed=True)  # killed after step 2; its checkpoint is at step 1
    redone = [{"env/all/correct": 0.75, "optim/lr": 7e-4}, {"env/all/correct": 0.875, "optim/lr": 6e-4}]
    _log(cfg, log_path, 1, redone).close()
    got = tensorboard_by_step(tmp_path / "tb")
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert sorted(got) == [0, 1, 2]
    # before the checkpoint: the first file's; the first run's steps 1 and 2 are hidden
    assert_same_rows(got, as_float32({0: ROWS[0], 1: redone[0], 2: redone[1]}))


class _Recorder:
    """A tracker that keeps what it receives and fails on demand (the logger's contract under test)."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.steps, self.closed = fail_at, [], []

    def log(self, step: int, metrics: Any) -> None:
        if step == self.fail_at:
            raise OSError("network is unreachable")
        self.steps.append(step)

    def close(self, failed: bool) -> None:
        self.closed.append(failed)


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_run_goes_on(tmp_path, capsys):
    flaky, steady = _Recorder(fail_at=1), _Recorder()
    logger = MetricsLogger(tmp_path, [("wandb_project", flaky), ("tensorboard_dir", steady)])
    for step, row in enumerate(ROWS):
        logger.log(step, row)
    logger.close()
    assert [r["step"] for r in logger.rows()] == [0, 1, 2]
    assert flaky.steps == [0] and flaky.closed == [True]  # not called again after its failure
    assert steady.steps == [0, 1, 2] and steady.closed == [False]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mathrl: warning: wandb_project stopped at step 1 (OSError: network is unreachable); "
        "metrics.jsonl has every step"
    ]


def test_closes_trackers_closes_on_return_and_marks_failed_on_error(tmp_path):
    trackers: list[_Recorder] = []

    @closes_trackers
    def trainer(fail: bool) -> None:
        trackers.append(_Recorder())
        MetricsLogger(tmp_path, [("tensorboard_dir", trackers[-1])]).log(0, ROWS[0])
        if fail:
            raise ValueError("disk full")

    trainer(False)
    with pytest.raises(ValueError, match="disk full"):
        trainer(True)
    assert [t.closed for t in trackers] == [[False], [True]]


def test_wandb_offline_history_config_and_resume_without_duplicated_steps(tmp_path):
    _needs_wandb()
    cfg, log_path = _run_dir(tmp_path, "run", wandb_project="mathrl-test")
    logger = _log(cfg, log_path, 0, ROWS)
    logger.close(failed=True)  # the first attempt was killed after step 2; its checkpoint is at step 1
    redone = [{"env/all/correct": 0.75}, {"env/all/correct": 0.875}, {"env/all/correct": 1.0}]
    _log(cfg, log_path, 1, redone).close()
    first, resumed = wandb_runs(log_path)
    assert first["id"] == resumed["id"] == json.loads((log_path / "wandb_run.json").read_text())["id"]
    assert_same_rows(first["history"], dict(enumerate(ROWS)))
    assert resumed["history"] == {3: redone[2]}  # steps 1-2 were sent already: not sent twice
    assert first["exit"] == [1] and resumed["exit"] == [0]
    assert first["config"] == {"log_path": str(log_path), "seed": 7, "env_args": {"a": 1}}


def _conversation(i: int) -> str:
    turns = [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
    return json.dumps({"messages": turns, "problem_id": f"p{i}"}) + "\n"


# --- configuration: the keys, a missing package ------------------------------------------------


def test_tracker_keys_on_both_commands_and_wandb_name_needs_a_project(tmp_path):
    for cls in (TrainConfig, SFTConfig):
        assert {"wandb_project", "wandb_name", "tensorboard_dir"} <= set(cls.__dataclass_fields__)
    from mathrl.cli import main

    assert main(["train", "wandb_name=x", f"log_path={tmp_path / 'never'}"]) == 2
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("command", "key", "package"),
    [("train", "wandb_project=p", "wandb"), ("sft", "tensorboard_dir=tb", "tensorboard")],
)
def test_a_missing_tracker_package_is_one_line_before_anything_is_created(
    tmp_path, monkeypatch, capsys, command, key, package
):
    from mathrl.cli import main

    monkeypatch.setitem(sys.modules, package, None)  # `import wandb` now fails as if not installed
    (tmp_path / "traces.jsonl").write_text("".join(_conversation(i) for i in range(20)))
    args = [command, key, f"log_path={tmp_path / 'run'}"]
    args += [f"train_file={tmp_path / 'traces.jsonl'}"] if command == "sft" else []
    assert main(args) == 2
    name = key.split("=")[0]
    assert capsys.readouterr().err == (
        f'mathrl {command}: error: {name} needs the {package} package: pip install -e ".[{package}]"\n'
    )
    assert not (tmp_path / "run").exists()


def test_changing_trackers_on_resume_is_allowed(tmp_path):
    from mathrl.train.run import check_resume

    log_path = tmp_path / "run"
    log_path.mkdir()
    (log_path / "config.json").write_text(json.dumps({"log_path": str(log_path)}))
    changed = TrainConfig(log_path=str(log_path), tensorboard_dir="tb", wandb_project="p", wandb_name="n")
    assert check_resume(changed, log_path, resumable={"log_path"}) is None
    with pytest.raises(ConfigError, match="seed"):
        check_resume(TrainConfig(log_path=str(log_path), seed=1), log_path, resumable={"log_path"})


# --- real runs on the embedded model -----------------------------------------------------------


@pytest.mark.slow
def test_mathrl_train_sends_metrics_jsonl_to_tensorboard_and_wandb(tmp_path):
    _needs_wandb()
    run, tb = tmp_path / "run", tmp_path / "tb"
    proc = subprocess.run(
        [sys.executable, "-m", "mathrl.cli", "train", "max_steps=2", "group_size=4", "groups_per_batch=3",
         "max_tokens=6", "env_args.max_operand=9", "env_args.test_size=8", "eval_every=2", "save_every=0",
         "num_threads=2", f"log_path={run}", f"tensorboard_dir={tb}", "wandb_project=mathrl-test"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = jsonl_by_step(run)
    assert sorted(rows) == [0, 1, 2] and "test/env/all/correct" in rows[0] and "optim/lr" in rows[1]
    assert_same_rows(tensorboard_by_step(tb), as_float32(rows))
    assert tensorboard_config(tb) == json.loads((run / "config.json").read_text())
    [wandb_run] = wandb_runs(run)
    assert_same_rows(wandb_run["history"], rows)
    assert wandb_run["config"] == json.loads((run / "config.json").read_text())
    assert wandb_run["exit"] == [0]


@pytest.mark.slow
def test_mathrl_sft_extended_continues_both_trackers(tmp_path):
    """A finished sft run given more steps resumes at its last checkpoint: TensorBoard shows
    metrics.jsonl exactly (the redone final row hidden), wandb continues the same run id with
    only the steps it did not have."""
    _needs_wandb()
    from mathrl.train.sft import sft

    (train := tmp_path / "train.jsonl").write_text("".join(_conversation(i) for i in range(4)))
    (test := tmp_path / "test.jsonl").write_text(_conversation(4))
    tb = tmp_path / "tb"
    cfg = SFTConfig(
        train_file=str(train), test_file=str(test), batch_size=2, max_steps=1, max_length=64, lora_rank=4,
        num_threads=2, log_path=str(tmp_path / "run"), tensorboard_dir=str(tb), wandb_project="mathrl-test",
        wandb_name="sft-test",
    )  # fmt: skip
    run = sft(cfg, progress=False)
    before = jsonl_by_step(run)
    sft(SFTConfig(**{**cfg.__dict__, "max_steps": 2}), progress=False)
    rows = jsonl_by_step(run)
    assert sorted(before) == [0, 1] and sorted(rows) == [0, 1, 2]
    assert "train_mean_nll" not in before[1] and "train_mean_nll" in rows[1]  # the final row was redone
    assert_same_rows(tensorboard_by_step(tb), as_float32(rows))
    first, extended = wandb_runs(run)
    assert first["id"] == extended["id"]
    assert_same_rows(first["history"], before)
    assert_same_rows(extended["history"], {2: rows[2]})  # step 1 is wandb's already: steps only increase
    assert first["config"]["max_steps"] == 1 and extended["config"]["max_steps"] == 2
