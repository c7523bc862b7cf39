"""Eval generation throughput: mathrl's sampler vs plain HF ``generate``, same problems, one run.

    .venv/bin/python bench/eval_throughput.py                  # 32 GSM8K problems, 256 tokens, bf16
    .venv/bin/python bench/eval_throughput.py --problems 64 --dtype float32

Greedy (temperature 0) replies from the embedded model to the first N GSM8K test problems,
rendered exactly as ``mathrl eval`` renders them, by:
- mathrl: ``LocalBackend.generate`` with per-problem seeds, the path ``mathrl eval`` takes;
- HF generate, one prompt at a time: ``model.generate(ids, do_sample=False)``, the plain use
  and the reference outputs (no padding involved);
- HF generate, batched: all prompts left-padded in one ``generate`` call (a stronger peer).
Each system has its own copy of the model in the same dtype. The table gives generated
tokens, wall time, tokens/s, speed relative to each HF way, and how many replies are
token-for-token identical to the one-at-a-time HF reference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mathrl.data.datasets import load_problems
from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_for_inference, resolve_model_path
from mathrl.prompts import math_messages
from mathrl.rollout.backend import LocalBackend
from mathrl.rollout.renderer import Renderer
from mathrl.runtime import tune_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--skip-single", action="store_true", help="leave out one-at-a-time HF generate (slow)")
    a = ap.parse_args()
    tune_allocator()  # as the mathrl command does; the HF runs below share the process, so they get it too
    dtype = getattr(torch, a.dtype)
    problems = load_problems("gsm8k", "test", data_dir=a.data_dir, limit=a.problems).problems
    model, tokenizer = load_for_inference(EMBEDDED_MODEL, dtype)
    conversations = [math_messages(p.problem) for p in problems]
    prompts = [Renderer(tokenizer).initial_tokens(c) for c in conversations]
    eos = eos_token_ids(tokenizer)
    rows: dict[str, tuple[list[list[int]], float]] = {}

    # mathrl: the eval path (per-problem seeds, so finished rows leave the batch)
    backend = LocalBackend(model, tokenizer)
    t0 = time.perf_counter()
    samples = backend.generate(
        conversations, n=1, max_tokens=a.max_tokens, temperature=0.0, seeds=list(range(len(conversations)))
    )
    wall = time.perf_counter() - t0
    completions = backend.sampler.sample(  # the token ids, for the comparison (not timed)
        prompts, max_tokens=a.max_tokens, temperature=0.0, seed=0, row_seeds=list(range(len(prompts)))
    )
    assert [len(c.tokens_T) for c in completions] == [s[0].num_tokens for s in samples]
    rows["mathrl"] = ([list(c.tokens_T) for c in completions], wall)

    # the peer: the model as plain transformers loads it (its default attention), no mathrl code
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED_MODEL), dtype=dtype).eval()
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    settings = dict(max_new_tokens=a.max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)

    def cut(ids: list[int]) -> list[int]:
        """Up to and including the first end-of-turn token, as mathrl returns completions."""
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
        return ids

    if not a.skip_single:
        t0, outs = time.perf_counter(), []
        with torch.inference_mode():
            for p in prompts:
                out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **settings)
                outs.append(cut(out[0, len(p) :].tolist()))
        rows["HF generate, one at a time"] = (outs, time.perf_counter() - t0)

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, **settings)
    rows["HF generate, batched"] = ([cut(o[width:].tolist()) for o in out], time.perf_counter() - t0)

    reference = rows.get("HF generate, one at a time", rows["HF generate, batched"])[0]
    speed = {name: sum(len(o) for o in outs) / wall for name, (outs, wall) in rows.items()}
    print(f"\n{len(prompts)} GSM8K test problems, greedy, max {a.max_tokens} new tokens, {a.dtype}, "
          f"{torch.get_num_threads()} threads; identical = token-for-token equal to "
          f"{'HF one at a time' if not a.skip_single else 'HF batched'}")  # fmt: skip
    head = f"{'system':<30}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'x HF single':>13}{'x HF batched':>14}"
    head += f"{'identical':>11}"
    print(head + "\n" + "-" * len(head))
    for name, (outs, wall) in rows.items():
        single = speed.get("HF generate, one at a time")
        same = sum(o == r for o, r in zip(outs, reference, strict=True))
        vs_batched = speed[name] / speed["HF generate, batched"]
        print(f"{name:<30}{sum(len(o) for o in outs):>8}{wall:>9.1f}{speed[name]:>9.1f}"
              f"{(f'{speed[name] / single:.2f}' if single else '-'):>13}{vs_batched:>14.2f}"
              f"{f'{same}/{len(outs)}':>11}")  # fmt: skip


if __name__ == "__main__":
    main()
