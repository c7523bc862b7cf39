"""GRPO step time: mathrl vs TRL's GRPOTrainer on ``bench-arith`` (../shared/DESIGN.md), in one run.

    .venv/bin/python bench/grpo_step.py              # mathrl, TRL fp32, TRL best; 8 steps each
    .venv/bin/python bench/grpo_step.py --steps 10 --systems mathrl,trl-best
    .venv/bin/python bench/grpo_step.py --systems mathrl --baseline /tmp/base   # vs another checkout

bench-arith: SmolLM2-135M-Instruct (the embedded model), "What is x + y?" with x, y uniform in
0..99 (seeded), reward 1 when the last integer of the completion equals x + y, 16 problems
x 4 samples per step, max 16 new tokens, temperature 1, LoRA r32/alpha 32 on all linear
projections, lr 1e-4, no KL, one optimizer step per batch. Both systems see the same prompts
(the user turn alone, rendered by the model's chat template) and the same reward function.

Each system runs in its own subprocess (so peak RSS is its own) and reports per step: wall
time, generation time, training time (the rest of the step), generated tokens, mean reward.
The parent measures this machine's matmul rates, counts the step's FLOPs, and prints one
table: median over steps 3..N (steps 1-2 warm up allocators and caches), the ratio to
TRL's best setting, and each system's step as a multiple of the compute floor.

``--baseline DIR`` adds ``mathrl@baseline``: the same worker importing mathrl from another
checkout (e.g. ``git worktree add /tmp/base HEAD~1``), so a change is timed against the code
before it in one run; the two alternate ``--rounds`` times.

Requires the bench extra: ``pip install -e ".[bench]"`` (TRL 1.16 is a bench-only dependency).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GROUP_SIZE, GROUPS, MAX_TOKENS, LORA_RANK, LR, SEED = 4, 16, 16, 32, 1e-4, 0
# name -> (description, environment overrides)
SYSTEMS: dict[str, str] = {
    "mathrl": "mathrl train (defaults: bf16 sampler with LoRA merged, bf16 autocast training)",
    "trl-fp32": "TRL GRPOTrainer, fp32, no gradient checkpointing",
    "trl-best": "TRL GRPOTrainer, bf16 autocast + gradient checkpointing (TRL's defaults)",
    "trl-best-malloc": "trl-best with mathrl's allocator setting (GLIBC_TUNABLES, same effect as runtime.py)",
}
_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647"


def problems(step: int) -> list[tuple[int, int]]:
    """The 16 problems of a step: a pure function of (SEED, step), shared by both systems."""
    rng = random.Random(f"bench-arith-{SEED}-{step}")
    return [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(GROUPS)]


def prompt_text(x: int, y: int) -> str:
    return f"What is {x} + {y}?"


def reward(completion: str, x: int, y: int) -> float:
    numbers = re.findall(r"-?\d+", completion.replace(",", ""))
    return float(bool(numbers) and int(numbers[-1]) == x + y)


# --------------------------------------------------------------------------------------------
# workers: one system, N steps, JSON out
# --------------------------------------------------------------------------------------------


def run_mathrl(steps: int, out: Path) -> list[dict[str, float]]:
    """The real ``mathrl train`` on an environment registered for this benchmark."""
    from mathrl.envs.base import SingleTurnBuilder
    from mathrl.envs.registry import ENVS, EnvSpec
    from mathrl.runtime import tune_allocator
    from mathrl.train.rl import TrainConfig, train
    from mathrl.types import Message

    tune_allocator()  # what the mathrl command does at start-up

    class BenchArith:
        def __init__(self, groups_per_batch: int) -> None:
            self.groups_per_batch = groups_per_batch

        def get_batch(self, index: int) -> list[SingleTurnBuilder]:
            return [
                SingleTurnBuilder((Message("user", prompt_text(x, y)),), str(x + y), "last_number")
                for x, y in problems(index)
            ]

        def test_builders(self) -> list[SingleTurnBuilder]:
            return self.get_batch(10_000)

    @dataclasses.dataclass(frozen=True)
    class NoOptions:
        pass

    ENVS["bench-arith"] = EnvSpec(NoOptions, lambda opts, gpb, seed: BenchArith(gpb), "bench/grpo_step.py")
    cfg = TrainConfig(
        env="bench-arith", group_size=GROUP_SIZE, groups_per_batch=GROUPS, learning_rate=LR,
        lr_schedule="constant", max_tokens=MAX_TOKENS, temperature=1.0, lora_rank=LORA_RANK,
        lora_alpha=LORA_RANK, remove_constant_reward_groups=False, max_steps=steps, eval_every=0,
        save_every=0, seed=SEED, log_path=str(out.parent / "mathrl-run"), save_rollouts=False,
    )  # fmt: skip
    run = train(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "step": r["time/step"],
            "generate": r["time/sample"],
            "train": r["time/train"],
            "tokens": r["env/all/ac_tokens_per_turn"] * GROUP_SIZE * GROUPS,
            "reward": r["env/all/reward/total"],
            "kl_sample_train": r.get("optim/kl_sample_train_v1", float("nan")),
        }
        for r in rows
        if "time/step" in r
    ]


def run_trl(steps: int, out: Path, bf16: bool, checkpointing: bool) -> list[dict[str, float]]:
    """TRL 1.16 GRPOTrainer on the CPU with the same model, prompts, reward and sizes."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mathrl.models import EMBEDDED_MODEL, resolve_model_path

    path = resolve_model_path(EMBEDDED_MODEL)
    rows = []
    for step in range(steps):
        for x, y in problems(step):
            rows.append({"prompt": [{"role": "user", "content": prompt_text(x, y)}], "x": x, "y": y})
    dataset = Dataset.from_list(rows)
    per_step: list[dict[str, float]] = [{} for _ in range(steps)]
    state = {"step": 0}

    def arith_reward(completions: list[Any], x: list[int], y: list[int], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scores = [reward(t, a, b) for t, a, b in zip(texts, x, y, strict=True)]
        per_step[state["step"]]["reward"] = sum(scores) / len(scores)
        return scores

    args = GRPOConfig(
        output_dir=str(out.parent / "trl-run"), use_cpu=True, bf16=bf16, gradient_checkpointing=checkpointing,
        per_device_train_batch_size=GROUP_SIZE * GROUPS, gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE, max_completion_length=MAX_TOKENS, temperature=1.0, learning_rate=LR,
        lr_scheduler_type="constant", beta=0.0, num_iterations=1, max_steps=steps, logging_steps=1,
        report_to="none", save_strategy="no", seed=SEED, shuffle_dataset=False, dataloader_num_workers=0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, reward_funcs=arith_reward, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip

    generate = trainer._generate

    def timed_generate(prompts: list[Any]) -> Any:
        t0 = time.perf_counter()
        result = generate(prompts)
        rec = per_step[state["step"]]
        rec["generate"] = time.perf_counter() - t0
        rec["tokens"] = float(sum(len(c) for c in result[1]))
        return result

    trainer._generate = timed_generate  # type: ignore[method-assign]

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            rec = per_step[state["step"]]
            rec["step"] = now - self.t
            rec["train"] = rec["step"] - rec.get("generate", 0.0)
            self.t = now
            state["step"] += 1

    trainer.add_callback(StepTimer())
    trainer.train()
    return per_step


def worker(system: str, steps: int, out: Path) -> None:
    import torch

    torch.manual_seed(SEED)
    if system == "mathrl":
        records = run_mathrl(steps, out)
    else:
        records = run_trl(steps, out, bf16=system != "trl-fp32", checkpointing=system != "trl-fp32")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.write_text(json.dumps({"system": system, "steps": records, "peak_rss_gb": peak}))


# --------------------------------------------------------------------------------------------
# parent: matmul rates, FLOP count, the table
# --------------------------------------------------------------------------------------------


def matmul_rates() -> dict[str, float]:
    """Best measured TFLOP/s of this machine for bf16 and fp32 at the model's training shapes."""
    import torch

    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for m, k, n in ((3584, 576, 1536), (3584, 1536, 576), (2048, 2048, 2048)):
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            torch.nn.functional.linear(a, w)
            reps, t0 = 5, time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(a, w)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12)
        rates[name] = best
    return rates


def step_flops(prompt_tokens: float, completion_tokens: float) -> float:
    """Matmul FLOPs of one bench-arith step (the issue's count): generation = one forward over
    64 x (prompt + completion) tokens; training = forward + input-gradient backward over them
    (the frozen base needs no weight gradient; LoRA's own FLOPs are added). 2 FLOPs per
    parameter per token forward, plus attention scores."""
    from transformers import AutoConfig

    from mathrl.models import EMBEDDED_MODEL, resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = h * h * 2 + h * kv * 2 + 3 * h * c.intermediate_size  # q, o, k, v, gate, up, down
    lora = LORA_RANK * ((h + h) * 2 + (h + kv) * 2 + 3 * (h + c.intermediate_size))
    seq = prompt_tokens + completion_tokens
    tokens = GROUP_SIZE * GROUPS * seq
    attention = 2 * 2 * seq / 2 * h  # QK^T and AV, causal: on average half the sequence
    forward = 2 * tokens * (c.num_hidden_layers * (layer + attention) + h * c.vocab_size)
    lora_fwd = 2 * tokens * c.num_hidden_layers * lora
    return forward + (forward * 2 + lora_fwd * 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per system (median over steps 3..N)")
    ap.add_argument("--systems", default="mathrl,trl-fp32,trl-best", help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--baseline", type=Path, help="another mathrl checkout, timed as mathrl@baseline")
    ap.add_argument("--rounds", type=int, default=1, help="with --baseline: alternate the two this many times")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.out)
        return
    if a.steps < 3:
        ap.error("--steps must be at least 3 (the median is over steps 3..N)")
    systems = a.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")

    runs = list(systems)
    if a.baseline is not None:
        SYSTEMS["mathrl@baseline"] = f"mathrl train from {a.baseline}"
        runs = [s for s in systems if s != "mathrl"] + ["mathrl", "mathrl@baseline"] * a.rounds
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, system in enumerate(runs):
            out = Path(tmp) / f"{k}-{system}" / "result.json"
            out.parent.mkdir()
            env = dict(os.environ)
            if system == "trl-best-malloc":
                env["GLIBC_TUNABLES"] = _TUNABLES
            if system == "mathrl@baseline":
                env["PYTHONPATH"] = str(a.baseline.resolve())
            print(f"running {system}: {SYSTEMS[system]} ...", flush=True)
            t0 = time.time()
            name = system.replace("-malloc", "").replace("@baseline", "")
            cmd = [sys.executable, __file__, "--worker", name, "--steps", str(a.steps)]
            proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
                raise SystemExit(f"{system} failed (exit {proc.returncode})")
            result = json.loads(out.read_text())
            if system in results:  # another round: its steps join the first round's
                results[system]["steps"] += result["steps"][2:]
                results[system]["peak_rss_gb"] = max(results[system]["peak_rss_gb"], result["peak_rss_gb"])
            else:
                results[system] = result
            print(f"  done in {time.time() - t0:.0f} s", flush=True)
    rates = matmul_rates()
    print_table(results, rates, a.steps)
    if a.json:
        a.json.write_text(json.dumps({"results": results, "rates": rates}, indent=1))


def print_table(results: dict[str, Any], rates: dict[str, float], steps: int) -> None:
    from transformers import AutoTokenizer

    from mathrl.models import EMBEDDED_MODEL, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    prompt_len = statistics.mean(
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": prompt_text(x, y)}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for x, y in problems(0)
    )

    def med(system: str, key: str) -> float:
        return statistics.median(r[key] for r in results[system]["steps"][2:])

    completion = statistics.mean(r["tokens"] for r in results["mathrl"]["steps"]) / (GROUP_SIZE * GROUPS) \
        if "mathrl" in results else MAX_TOKENS  # fmt: skip
    flops = step_flops(prompt_len, completion)
    floor = flops / (rates["bf16"] * 1e12)
    trl = [s for s in results if s.startswith("trl")]
    best_trl = min(trl, key=lambda s: med(s, "step")) if trl else None
    print(f"\nbench-arith, {steps} steps per system, medians over steps 3..{steps}; "
          f"{os.cpu_count()} CPU threads; torch {__import__('torch').__version__}")  # fmt: skip
    print(f"matmul rate: bf16 {rates['bf16']:.2f} TFLOP/s, fp32 {rates['fp32']:.2f} TFLOP/s; step FLOPs "
          f"{flops / 1e12:.2f} T (prompt {prompt_len:.0f} + completion {completion:.1f} tokens x 64) "
          f"-> compute floor {floor:.2f} s at the bf16 rate")  # fmt: skip
    head = f"{'system':<16}{'step s':>8}{'gen s':>8}{'train s':>9}{'gen tok/s':>11}{'peak RSS':>10}"
    head += f"{'x floor':>9}{'/ ' + (best_trl or 'TRL'):>18}"
    print(head)
    print("-" * len(head))
    for s in results:
        step, gen, train = med(s, "step"), med(s, "generate"), med(s, "train")
        toks = statistics.median(r["tokens"] / r["generate"] for r in results[s]["steps"][2:])
        ratio = f"{step / med(best_trl, 'step'):.3f}" if best_trl else "-"
        print(f"{s:<16}{step:>8.2f}{gen:>8.2f}{train:>9.2f}{toks:>11.0f}{results[s]['peak_rss_gb']:>8.2f}GB"
              f"{step / floor:>9.2f}{ratio:>18}")  # fmt: skip
    if "mathrl" in results and "mathrl@baseline" in results:
        print(f"\nmathrl / mathrl@baseline: step {med('mathrl', 'step') / med('mathrl@baseline', 'step'):.3f}, "
              f"gen {med('mathrl', 'generate') / med('mathrl@baseline', 'generate'):.3f}, "
              f"train {med('mathrl', 'train') / med('mathrl@baseline', 'train'):.3f}")  # fmt: skip
    print("\nmean reward per step (so speed is never bought with a broken step):")
    for s in results:
        print(f"  {s:<16}" + " ".join(f"{r['reward']:.3f}" for r in results[s]["steps"]))
    if "mathrl" in results:
        kl = [r["kl_sample_train"] for r in results["mathrl"]["steps"]]
        print("mathrl's bf16 sampler vs its trainer, mean logprob gap per token (optim/kl_sample_train_v1): "
              + " ".join(f"{k:+.4f}" for k in kl))  # fmt: skip


if __name__ == "__main__":
    main()
