"""Run directories for the report tests, written from rows shaped exactly as ``mathrl train``,
``sft``, ``eval`` and ``distill`` write them (copied from real runs on the embedded model,
2026-11-30), so the report is tested on the real format without running a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ATTACK = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
"""Model text that would run as script if the page did not escape it."""

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 4 + 5?<|im_end|>\n<|im_start|>assistant\n9<|im_end|>\n"
    "<|im_start|>user\nWhat is {x} + {y}?<|im_end|>\n<|im_start|>assistant\n"
)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_metrics(step: int, evaluated: bool) -> dict[str, Any]:
    """A metrics.jsonl row of ``mathrl train`` on arithmetic (the keys of a real run)."""
    row: dict[str, Any] = {"step": step}
    if evaluated:
        row |= {
            "test/env/all/correct": 0.0625 * (step + 1), "test/pass@1/ci_low": 0.011 * (step + 1),
            "test/pass@1/ci_high": 0.28 + 0.05 * step, "test/env/all/ac_tokens_per_turn": 3.375 + step,
            "test/env/all/frac_truncated": 0.0, "test/env/all/frac_no_answer": 0.0, "time/eval": 3.5,
        }  # fmt: skip
    row |= {
        "env/all/reward/total": 0.1875 + 0.05 * step, "env/all/ac_tokens_per_turn": 6.5 + step,
        "env/all/turns_per_episode": 1.0, "env/all/frac_truncated": 0.1875, "env/all/correct": 0.1875 + 0.05 * step,
        "env/all/format": 0.875, "env/all/grader_timeouts": 0.0, "env/all/by_group/frac_mixed": 0.75,
        "env/all/by_group/frac_all_good": 0.0, "env/all/by_group/frac_all_bad": 0.25, "time/sample": 10.9,
        "time/wait_for_samples": 10.9, "optim/staleness_mean": 0.0, "optim/groups_dropped_stale": 0.0,
        "optim/num_sequences": 12, "optim/entropy": 1.69 - 0.1 * step, "optim/frac_ratio_outside_clip": 0.0116,
        "optim/kl_sample_train_v1": 0.0045, "optim/kl_sample_train_v2": 0.0019, "optim/loss": -0.0964,
        "optim/ratio_mean": 0.997, "optim/grad_norm": 0.294, "optim/advantage_abs_mean": 0.375, "time/train": 3.9,
        "progress/batch": step, "optim/lr": 0.001 * (1 - step / 10), "time/step": 18.3, "time/total": 18.3 * (step + 1),
        "mem/peak_rss_gb": 1.72,
    }  # fmt: skip
    return row


def rollout_rows(step: int, groups: int = 4, group_size: int = 4, text: str = "") -> list[dict[str, Any]]:
    """``rollouts/step_N.jsonl`` of a single-turn run: group g's completion i is right when i < g."""
    rows = []
    for g in range(groups):
        x, y = 10 + g, 5 + step
        rewards = [1.0 if i < g else 0.0 for i in range(group_size)]
        mean = sum(rewards) / group_size
        constant = len(set(rewards)) == 1
        for i, reward in enumerate(rewards):
            answer = str(x + y) if reward else str(x + y + 1 + i)
            rows.append({
                "group": g, "turn": 0.0, "reward": reward, "total_reward": reward,
                "advantage": None if constant else reward - mean, "prompt": PROMPT.format(x=x, y=y),
                "completion": text or f"The answer is {answer}.", "finish_reason": "length" if i == 3 else "stop",
                "correct": reward, "format": 1.0, "grader_timeout": 0.0, "answer": answer, "reference": str(x + y),
            })  # fmt: skip
    return rows


def eval_rows(n_problems: int = 8, samples: int = 1) -> list[dict[str, Any]]:
    """``eval/step_N.jsonl`` (and ``mathrl eval``'s ``<model>/<bench>.jsonl``): problem i is right when odd."""
    rows = []
    for i in range(n_problems):
        correct = [bool(i % 2)] * samples
        rows.append({
            "id": str(i),
            "prompt": [{"role": "user", "content": "What is 4 + 5?"}, {"role": "assistant", "content": "9"},
                       {"role": "user", "content": f"What is {i} + 1?"}],
            "reference": str(i + 1), "correct": correct, "votes": [0] * samples,
            "samples": [{"text": str(i + 1 if c else i), "answer": str(i + 1 if c else i), "correct": c, "tokens": 3,
                         "finish_reason": "stop", "grader_timeout": False} for c in correct],
            "seconds": 0.217,
        })  # fmt: skip
    return rows


def tool_episode_rows() -> list[dict[str, Any]]:
    """One group of a ``math_python`` step, as a real run wrote it: an episode whose tool call
    fails (syntax) and whose second reply is cut at max_tokens, then a one-turn episode."""
    errors = {f"num_tool_errors/{k}": 0.0 for k in ("parse", "runtime", "timeout", "memory", "output_limit", "sandbox")}
    base = {"group": 0, "prompt": "<|im_start|>user\nWhat is 603 * 853?<|im_end|>\n<|im_start|>assistant\n"}
    return [
        {**base, "turn": 0.0, "reward": -0.1, "total_reward": -0.1, "advantage": -0.325,
         "completion": "```python\nweight = 603\n    numOfPeople = 853\n```", "finish_reason": "stop", "correct": 0.0,
         "num_tool_calls": 1.0, "num_tool_errors": 1.0, "num_state_lost": 0.0, **errors, "num_tool_errors/syntax": 1.0,
         "tool_calls": [{"code": "weight = 603\n    numOfPeople = 853",
                         "output": '  File "<cell 1>", line 2\n    numOfPeople = 853\n'
                                   "IndentationError: unexpected indent\n",
                         "error": "syntax", "state_lost": False, "duration_s": 0.1195}],
         "parse_errors": []},
        {**base, "turn": 1.0, "reward": 0.0, "total_reward": -0.1, "advantage": -0.325,
         "completion": "Replace code like this with:\n\n```python\nprint(603 / 853", "finish_reason": "length",
         "correct": 0.0, "format": 0.0, "grader_timeout": 0.0, "void": 1.0, "over_budget": 0.0, "answer": None,
         "reference": "514359"},
        {**base, "turn": 0.0, "reward": 1.0, "total_reward": 1.0, "advantage": 0.775,
         "completion": "603 * 853 = \\boxed{514359}", "finish_reason": "stop", "correct": 1.0, "format": 1.0,
         "grader_timeout": 0.0, "void": 0.0, "over_budget": 0.0, "answer": "514359", "reference": "514359"},
    ]  # fmt: skip


def make_train_run(
    path: Path, steps: int = 3, eval_every: int = 1, rollouts: bool = True, text: str = "", group_size: int = 4
) -> Path:
    """A finished ``mathrl train`` directory of ``steps`` steps (evaluations at every
    ``eval_every`` steps, 0 = none, and after the end)."""
    path.mkdir(parents=True)
    config = {"env": "arithmetic", "env_args": {"test_size": 8}, "model_name": "embedded:SmolLM2-135M-Instruct",
              "group_size": group_size, "groups_per_batch": 4, "learning_rate": 0.001, "max_steps": steps,
              "eval_every": eval_every, "save_rollouts": rollouts, "log_path": str(path)}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rows = [train_metrics(s, bool(eval_every) and s % eval_every == 0) for s in range(steps)]
    if eval_every:
        rows.append({k: v for k, v in train_metrics(steps, True).items() if k.startswith("test/") or k == "step"})
    _write_jsonl(path / "metrics.jsonl", rows)
    for r in rows:
        if "test/env/all/correct" in r:
            _write_jsonl(path / "eval" / f"step_{r['step']:06d}.jsonl", eval_rows())
    if rollouts:
        for s in range(steps):
            _write_jsonl(path / "rollouts" / f"step_{s:06d}.jsonl", rollout_rows(s, group_size=group_size, text=text))
    (path / "checkpoints" / f"step_{steps:06d}").mkdir(parents=True)
    _write_jsonl(path / "checkpoints.jsonl", [{"step": steps, "path": f"checkpoints/step_{steps:06d}", "final": True}])
    return path


def make_eval_dir(path: Path, label: str = "SmolLM2-135M-Instruct") -> Path:
    """A ``mathrl eval`` output directory: one model on gsm8k, 4 problems x 2 samples."""
    (path / label).mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": "embedded:SmolLM2-135M-Instruct", "benchmarks": "gsm8k",
                                                  "n": 2, "output_dir": str(path)}))  # fmt: skip
    summary = {"benchmark": "gsm8k", "problems": 4, "samples_per_problem": 2, "pass1": 0.25, "pass1_low": 0.0712,
               "pass1_high": 0.5906, "pass_at": {"1": 0.25, "2": 0.5}, "maj_at": {"1": 0.25, "2": 0.25},
               "mean_tokens": 32.0, "truncation_rate": 1.0, "no_answer_rate": 0.75, "tools": None, "model": label,
               "mathrl_version": "0.1.0", "git_sha": "470479a"}  # fmt: skip
    (path / label / "gsm8k.summary.json").write_text(json.dumps(summary, indent=2))
    _write_jsonl(path / label / "gsm8k.jsonl", eval_rows(4, samples=2))
    return path
