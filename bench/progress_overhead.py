"""Does eval's per-problem progress cost throughput? ``LocalBackend.generate`` (the ``mathrl eval``
path) on the same 32 GSM8K problems, greedy, 128 tokens, bf16, with and without the ``on_done``
callback, alternating in one process after a warm-up; prints wall, tokens and tok/s per run.

    .venv/bin/python bench/progress_overhead.py [--data-dir ../shared/data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from mathrl.data.datasets import load_problems
from mathrl.models import EMBEDDED_MODEL
from mathrl.prompts import math_messages
from mathrl.rollout.backend import LocalBackend
from mathrl.runtime import tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tune_allocator()
    problems = load_problems("gsm8k", "test", data_dir=args.data_dir, limit=32).problems
    conversations = [math_messages(p.problem) for p in problems]
    backend = LocalBackend.load(EMBEDDED_MODEL, torch.bfloat16)

    def run(callback: bool) -> tuple[float, int, int]:
        calls: list[object] = []
        t0 = time.perf_counter()
        out = backend.generate(conversations, n=1, max_tokens=128, temperature=0.0, seeds=list(range(32)),
                               on_done=calls.append if callback else None)  # fmt: skip
        return time.perf_counter() - t0, sum(s[0].num_tokens for s in out), len(calls)

    run(False)  # warm-up
    print("| callback | wall s | tokens | tok/s | progress calls |\n|---|---|---|---|---|")
    for _ in range(args.rounds):
        for callback in (False, True):
            wall, tokens, calls = run(callback)
            print(f"| {callback} | {wall:.2f} | {tokens} | {tokens / wall:.1f} | {calls} |")


if __name__ == "__main__":
    main()
