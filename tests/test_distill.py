"""``mathrl distill`` end to end with the embedded model as the teacher: samples, traces,
yield report, and a run killed with SIGKILL and rerun (nothing lost, nothing duplicated)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathrl.config import parse_config
from mathrl.train.distill import DistillConfig, run_distill

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")
TEACHER = "SmolLM2-135M-Instruct"
SUFFIX = " Answer with just the number."
SUMS = [(1, 1, 1, "add"), (5, 5, 2, "add"), (2, 2, 1, "sum"), (3, 5, 2, "sum")]  # a, b, level, subject


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """Four GSM8K problems and four trivial sums (which even the 135M model sometimes gets right)."""
    sums = tmp_path_factory.mktemp("data") / "sums.jsonl"
    sums.write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b), "level": lv, "subject": s})
        + "\n" for i, (a, b, lv, s) in enumerate(SUMS)
    ))  # fmt: skip
    return [f"datasets=gsm8k,{sums}", f"data_dir={SHARED}", "limit=4", "n=2", "max_tokens=12", "temperature=0.3",
            "seed=1", f"suffix={SUFFIX}", "style=last_number", "dtype=fp32", "chunk_size=2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    return run_distill(parse_config(DistillConfig, [*args, f"output_dir={out}"]))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _samples(out: Path) -> dict[str, list[dict]]:
    """Sample rows per dataset, without the timing field."""
    return {
        name: [{k: v for k, v in row.items() if k != "seconds"} for row in _jsonl(out / TEACHER / f"{name}.jsonl")]
        for name in ("gsm8k", "sums")
    }


def test_distill_writes_samples_only_correct_traces_and_a_yield_report(uninterrupted, args):
    out = uninterrupted
    samples = _samples(out)
    assert [r["id"] for r in samples["gsm8k"]] == [f"gsm8k/train/{i}" for i in range(4)]
    assert [r["id"] for r in samples["sums"]] == ["s0", "s1", "s2", "s3"]
    problems = {r["id"]: r for r in _jsonl(Path(args[0].split(",")[1]))}
    expected = set()
    for dataset, rows in samples.items():
        for row in rows:
            assert len(row["samples"]) == 2 and all(0 < s["tokens"] <= 12 for s in row["samples"])
            for j, s in enumerate(row["samples"]):
                if s["correct"] and s["finish_reason"] == "stop":
                    expected.add((dataset, row["id"], j))
    traces = _jsonl(out / "traces.jsonl")
    assert traces, "no correct trace at all: the test would check nothing"
    assert {(t["dataset"], t["problem_id"], t["sample_index"]) for t in traces} == expected
    assert len(traces) == len(expected)  # no duplicates
    for t in traces:
        sample = next(r for r in samples[t["dataset"]] if r["id"] == t["problem_id"])["samples"][t["sample_index"]]
        user, assistant = t["messages"]
        assert user["role"] == "user" and user["content"].endswith(SUFFIX)
        assert assistant == {"role": "assistant", "content": sample["text"]}
        assert t["answer"] == sample["answer"] and t["num_tokens"] == sample["tokens"]
        assert t["num_chars"] == len(sample["text"]) and t["source"] == TEACHER
        if t["dataset"] == "sums":
            p = problems[t["problem_id"]]
            assert user["content"] == p["problem"] + SUFFIX and t["reference"] == p["answer"]
            assert (t["level"], t["subject"]) == (p["level"], p["subject"])

    report = json.loads((out / "yield.json").read_text())
    by = {(r["dataset"], r["group"]): r for r in report}
    assert list(by) == [("gsm8k", "all"), ("sums", "all"), ("sums", "level 1"), ("sums", "level 2"),
                        ("sums", "subject add"), ("sums", "subject sum"), ("all datasets", "all")]  # fmt: skip
    for dataset, rows in samples.items():
        r = by[(dataset, "all")]
        correct = sum(sum(row["correct"]) for row in rows)
        assert (r["problems"], r["samples"], r["correct"]) == (4, 8, correct)
        assert r["yield"] == pytest.approx(correct / 8) and r["solved"] == sum(any(row["correct"]) for row in rows)
        assert r["traces"] == sum(d == dataset for d, _, _ in expected)
    level1 = [row for row in samples["sums"] if problems[row["id"]]["level"] == 1]
    assert by[("sums", "level 1")]["correct"] == sum(sum(row["correct"]) for row in level1)
    assert by[("all datasets", "all")]["samples"] == 16
    assert by[("all datasets", "all")]["traces"] == len(traces)
    assert (out / "yield.md").read_text().startswith("| teacher | dataset | group |")

    with pytest.raises(ValueError, match="max_tokens: 12 -> 16"):
        changed = [a.replace("max_tokens=12", "max_tokens=16") for a in args]
        run_distill(parse_config(DistillConfig, [*changed, f"output_dir={out}"]))


def test_a_killed_distill_resumes_without_losing_or_duplicating_anything(uninterrupted, args, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mathrl.cli", "distill", *args, f"output_dir={out}"]
    files = [out / TEACHER / "gsm8k.jsonl", out / TEACHER / "sums.jsonl"]

    def rows_written() -> int:
        return sum(len(p.read_text().splitlines()) for p in files if p.exists())

    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while rows_written() == 0 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its grading workers, mid-run
        finally:
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
    before = {p.name: p.read_text() for p in files if p.exists()}
    assert 0 < rows_written() < 16, "the kill did not land mid-run"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for name, text in before.items():  # rows written before the kill are kept as they were
        assert (out / TEACHER / name).read_text().startswith(text)
    resumed = _samples(out)
    for rows in resumed.values():
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == 4
    # the same samples, texts included, as a run that was never interrupted
    assert resumed == _samples(uninterrupted)
    traces = _jsonl(out / "traces.jsonl")
    keys = [(t["dataset"], t["problem_id"], t["sample_index"]) for t in traces]
    assert len(keys) == len(set(keys))
    assert traces == _jsonl(uninterrupted / "traces.jsonl")
    assert json.loads((out / "yield.json").read_text()) == json.loads((uninterrupted / "yield.json").read_text())


def test_only_correct_replies_that_ended_become_traces_with_the_prompt_the_teacher_saw():
    from mathrl.eval.runner import items_from_problems
    from mathrl.train.distill import distilled_traces, yield_rows
    from mathrl.types import Problem

    problems = [Problem("p0", "What is 1 + 1?", "2", level=3, subject="add"), Problem("p1", "What is 2 + 2?", "4")]
    items = items_from_problems(problems, suffix=" Box it.", few_shot=1, system_prompt="Be brief.")

    def sample(text: str, correct: bool, finish: str = "stop") -> dict:
        return {"text": text, "answer": text[-1], "correct": correct, "tokens": 7, "finish_reason": finish}

    rows = [
        {"id": "p0", "reference": "2", "correct": [True, False, True],
         "samples": [sample("so 2", True), sample("so 3", False), sample("so 1 + 1 = 2", True, "length")]},
        {"id": "p1", "reference": "4", "correct": [False], "samples": [sample("so 5", False)]},
    ]  # fmt: skip
    traces = distilled_traces(problems, items, rows, source="teacher", dataset="d")
    assert [(t["problem_id"], t["sample_index"]) for t in traces] == [("p0", 0)]
    assert traces[0]["messages"] == [  # the few-shot example turns are not part of the trace
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 1? Box it."},
        {"role": "assistant", "content": "so 2"},
    ]
    assert (traces[0]["level"], traces[0]["subject"], traces[0]["reference"]) == (3, "add", "2")
    with_cut = distilled_traces(problems, items, rows, source="teacher", dataset="d", keep_truncated=True)
    assert [(t["problem_id"], t["sample_index"]) for t in with_cut] == [("p0", 0), ("p0", 2)]
    report = yield_rows("teacher", "d", problems, rows, traces)
    assert [r["group"] for r in report] == ["all", "level 3", "subject add"]
    assert {k: report[0][k] for k in ("problems", "samples", "correct", "solved", "traces")} == {
        "problems": 2, "samples": 4, "correct": 2, "solved": 1, "traces": 1,
    }  # fmt: skip
    assert report[0]["yield"] == 0.5 and report[0]["truncated"] == 0.25
