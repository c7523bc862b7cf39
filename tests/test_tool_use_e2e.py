"""Tool use end to end on the embedded model: stop strings, a multi-turn RL step, a multi-turn eval.

The embedded SmolLM2-135M writes Python readily in Markdown code blocks (and almost never
``<tool_call>``: measured 0 of 64 at temperature 1), so these runs use ``tool_parser=code_block``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mathrl.config import parse_config
from mathrl.envs.math_python import ToolOptions, tool_messages
from mathrl.eval.command import EvalConfig, run_eval
from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_for_inference
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.sampler import TorchSampler
from mathrl.tools.python import PYTHON
from mathrl.train.rl import TrainConfig, train

pytestmark = pytest.mark.slow
ARITHMETIC = {"dataset": "arithmetic", "operators": "*", "min_operand": 100, "max_operand": 999, "test_size": 8}


def test_a_row_stops_right_where_its_text_first_contains_a_stop_string():
    model, tokenizer = load_for_inference(EMBEDDED_MODEL, torch.float32)
    renderer = Renderer(tokenizer, "code_block")
    sampler = TorchSampler(model, eos_token_ids(tokenizer), tokenizer.pad_token_id, tokenizer=tokenizer)
    questions = [f"What is {a} * {b}?" for a, b in [(402, 116), (856, 115), (870, 385), (281, 253)]]
    prompts = [renderer.initial_tokens(tool_messages(q, ToolOptions()), (PYTHON,)) for q in questions for _ in range(4)]
    seeds = list(range(len(prompts)))
    stop = "python\n"  # the end of the opening fence: most rows reach it
    free = sampler.sample(prompts, max_tokens=40, temperature=1.0, seed=0, row_seeds=seeds)
    stopped = sampler.sample(prompts, max_tokens=40, temperature=1.0, seed=0, row_seeds=seeds, stop=[stop])
    hits = 0
    for a, b in zip(free, stopped, strict=True):  # rows leave the batch sooner: logprobs equal to rounding
        cut = next((k for k in range(1, len(a.tokens_T) + 1) if stop in tokenizer.decode(a.tokens_T[:k])), None)
        if cut is None:  # never reached the stop string: the same sample
            assert (b.tokens_T, b.finish_reason) == (a.tokens_T, a.finish_reason)
        else:
            hits += 1
            assert b.tokens_T == a.tokens_T[:cut] and b.finish_reason == "stop"
        assert b.logprobs_T == pytest.approx(a.logprobs_T[: len(b.logprobs_T)], abs=1e-4)
    assert hits >= 8


def test_a_multi_turn_rl_step_trains_on_exactly_the_sampled_tokens(tmp_path: Path):
    cfg = TrainConfig(
        env="math_python", env_args=dict(ARITHMETIC), tool_parser="code_block", max_tokens=40, group_size=4,
        groups_per_batch=4, max_steps=1, eval_every=0, log_path=str(tmp_path / "run"), sample_dtype="float32",
        train_bf16=False, remove_constant_reward_groups=False, lora_rank=8,
    )  # fmt: skip
    run = train(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = rows[0]
    assert step["env/all/num_tool_calls"] > 0 and step["env/all/num_turns"] > 1
    assert step["optim/num_sequences"] == 16
    # sampler (fp32) and trainer (fp32) logprobs of the action tokens agree: the masks line up
    # across turns; a mask shifted by one token, or tool output scored as action, would not
    assert abs(step["optim/kl_sample_train_v1"]) < 1e-3 and step["optim/kl_sample_train_v2"] < 1e-3
    final = rows[-1]
    assert "test/env/all/correct" in final and final["test/env/all/num_turns"] >= 1
    assert 0 <= final["test/env/all/valid_call_rate"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["sandbox"].startswith(("bwrap", "rlimit"))
    rollouts = [json.loads(line) for line in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    calls = [c for r in rollouts for c in r.get("tool_calls", [])]
    assert calls and {"code", "output", "error", "duration_s", "state_lost"} <= set(calls[0])


def test_eval_with_and_without_the_tool(tmp_path: Path):
    bench = tmp_path / "mul3.jsonl"
    problems = [(402, 116), (856, 115), (870, 385)]
    bench.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"What is {a} * {b}?", "answer": str(a * b)})
                             + "\n" for i, (a, b) in enumerate(problems)))  # fmt: skip
    args = [f"benchmarks={bench}", "n=2", "temperature=1", "max_tokens=48", "tool_parser=code_block",
            "dtype=fp32", "suffix="]  # fmt: skip
    with_tool = run_eval(parse_config(EvalConfig, [*args, "tools=python", f"output_dir={tmp_path / 'tool'}"]))
    summary = with_tool[next(iter(with_tool))][0]
    assert summary.tools is not None and summary.tools["mean_turns"] > 1 and summary.tools["mean_tool_calls"] > 0
    rows_file = next((tmp_path / "tool").rglob("mul3.jsonl"))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    sample = rows[0]["samples"][0]
    assert sample["num_turns"] == len(sample["turns"]) and sample["turns"][0]["text"]
    call = next(c for r in rows for s in r["samples"] for t in s["turns"] for c in t.get("tool_calls", []))
    assert {"code", "output", "error", "duration_s", "state_lost"} <= set(call)
    table = (tmp_path / "tool" / "ablation.md").read_text()
    assert "| turns | tool calls | tool errors | valid calls |" in table
    before = rows_file.read_text()
    run_eval(parse_config(EvalConfig, [*args, "tools=python", f"output_dir={tmp_path / 'tool'}"]))  # resumes
    assert rows_file.read_text() == before
    plain = run_eval(parse_config(EvalConfig, [*args, f"output_dir={tmp_path / 'plain'}"]))
    assert plain[next(iter(plain))][0].tools is None
