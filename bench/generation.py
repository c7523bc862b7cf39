"""Generation side by side on the same token-id prompts: mathrl's TorchSampler (its default, the
static-cache path, and the eager path that path replaces), HF ``generate`` (batched, left-padded) and vLLM-CPU. One run.

    .venv/bin/python bench/generation.py                      # everything, ~15-20 min on 2 cores
    .venv/bin/python bench/generation.py --systems mathrl,mathrl_eager --workloads gsm8k32_greedy
    .venv/bin/python bench/generation.py --table          # the table again from --out/results.json
    .venv/bin/python bench/generation.py --alternate --workloads gsm8k32_greedy,gsm8k64_greedy --reps 2
                                                          # mathrl vs mathrl_eager in one process, alternating

Workloads (embedded SmolLM2-135M-Instruct, bf16; prompts rendered by mathrl's Renderer as eval does):
  gsm8k32_{greedy,t1}: the first 32 GSM8K test problems x 128 new tokens;
  gsm8k64_{greedy,t1}: the first 64 x 256 new tokens;
  arith: bench-arith's batch (bench/grpo_step.py: 16 "What is x + y?" problems x 4 samples) x 16
         tokens, temperature 1 (what a training step samples).
Systems, each in its own process, one after the other, nothing else running:
  mathrl:        ``TorchSampler`` as ``mathrl eval`` calls it (per-row seeds; arith with one seed, as
                 training does), its default ``static_cache=auto``: calls of 32+ tokens decode with
                 mathrl.rollout.static_cache (preallocated cache, prepacked weights, SDPA), arith's
                 16-token calls with transformers' forward;
  mathrl_eager:  the same with ``static_cache=off`` (transformers' forward with a DynamicCache
                 for every call: the path before the static cache);
  hf:           ``model.generate`` on the left-padded batch (greedy, or do_sample at T=1);
  vllm:         vLLM-CPU 0.32 in its own venv (mathrl.vllm_cpu; both cores bound), one batched
                ``/v1/completions`` request with token-id prompts; skipped with a message when its venv
                is absent (``python -m mathrl.vllm_cpu venv`` builds it).
Each workload is run once to warm up, then ``--reps`` times (median reported). Per system and workload:
tokens/s (tokens actually generated, end-of-turn included), ms per decode step (wall / longest row),
time to first token (the same prompts with max_tokens=1), the process's peak RSS; greedy agreement with
mathrl (rows token-identical; mean share of the shorter row before the first difference). The hardware
floor is measured in the same run: the bf16 matmul rate (2048^3) and the read bandwidth (sum of 512 MB);
a decode step at batch B reads the weights once and the filled KV cache, and does 2 x params x B FLOPs:
floor = max(FLOPs / rate, bytes / bandwidth); the table gives measured step / floor.

Writes --out/results.json and --out/table.md.

--alternate: the sampler's default and its eager path (``static_cache=off``) on one model in one
process, calls alternating (ABBA), so the machine's drift between processes cannot favour either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORKLOADS: dict[str, tuple[str, int, int, float]] = {  # name: (prompts, rows, max_tokens, temperature)
    "gsm8k32_greedy": ("gsm8k", 32, 128, 0.0),
    "gsm8k32_t1": ("gsm8k", 32, 128, 1.0),
    "gsm8k64_greedy": ("gsm8k", 64, 256, 0.0),
    "gsm8k64_t1": ("gsm8k", 64, 256, 1.0),
    "arith": ("arith", 64, 16, 1.0),
}
SYSTEMS = ("mathrl", "mathrl_eager", "hf", "vllm")
SERVED = "smollm2"


def build_prompts(data_dir: str) -> dict[str, list[list[int]]]:
    from grpo_step import problems, prompt_text

    from mathrl.data.datasets import load_problems
    from mathrl.models import EMBEDDED_MODEL, load_tokenizer
    from mathrl.prompts import math_messages
    from mathrl.rollout.renderer import Renderer
    from mathrl.types import Message

    renderer = Renderer(load_tokenizer(EMBEDDED_MODEL))
    arith = [renderer.initial_tokens([Message("user", prompt_text(x, y))]) for x, y in problems(0)]
    gsm8k = load_problems("gsm8k", "test", data_dir=data_dir, limit=64).problems
    return {
        "arith": [p for p in arith for _ in range(4)],  # 4 samples of each, in a row, as run_groups asks
        "gsm8k": [renderer.initial_tokens(math_messages(p.problem)) for p in gsm8k],
    }


def workload_prompts(prompts: dict[str, list[list[int]]], name: str) -> list[list[int]]:
    source, rows, _, _ = WORKLOADS[name]
    return prompts[source][:rows]


Generate = Callable[[list[list[int]], int, float, int], list[list[int]]]
"""(prompts, max_tokens, temperature, seed) -> the generated token ids of each prompt."""


def measure(run: Generate, prompts: dict[str, list[list[int]]], workloads: list[str], reps: int) -> dict[str, Any]:
    """Each workload: a warm-up call, a max_tokens=1 call (time to first token), then ``reps`` timed calls."""
    result: dict[str, Any] = {}
    for name in workloads:
        ps, (_, _, max_tokens, temperature) = workload_prompts(prompts, name), WORKLOADS[name]
        run(ps, max_tokens, temperature, 10_000)  # warm-up, same shape
        t0 = time.perf_counter()
        run(ps, 1, temperature, 10_001)
        ttft = time.perf_counter() - t0
        reps_out = []
        for r in range(reps):
            t0 = time.perf_counter()
            tokens = run(ps, max_tokens, temperature, r)
            reps_out.append({"wall_s": time.perf_counter() - t0, "tokens": sum(map(len, tokens)),
                             "steps": max(map(len, tokens)), "outputs": tokens})  # fmt: skip
        result[name] = {"reps": reps_out, "ttft_s": ttft}
    return result


# --- one system in its own process --------------------------------------------------------------


STATIC_CACHE = {"mathrl": "auto", "mathrl_eager": "off"}
"""The sampler's ``static_cache`` per mathrl system (hf reuses mathrl's model and path)."""


def embedded_bf16() -> tuple[Any, Any, list[int]]:
    """(tokenizer, bf16 model, end-of-turn ids) of the embedded model, allocator tuned as the CLI does."""
    import torch

    from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_model, load_tokenizer
    from mathrl.runtime import tune_allocator

    tune_allocator()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    return tokenizer, load_model(EMBEDDED_MODEL, torch.bfloat16).eval(), eos_token_ids(tokenizer)


def mathrl_sampler(system: str, tokenizer: Any, model: Any, eos: list[int]) -> Any:
    from mathrl.rollout.sampler import TorchSampler

    return TorchSampler(model, eos, tokenizer.pad_token_id, tokenizer=tokenizer,
                        static_cache=STATIC_CACHE.get(system, "auto"))  # fmt: skip


def torch_worker(system: str, prompts_path: Path, out: Path, workloads: list[str], reps: int) -> None:
    import torch

    prompts = json.loads(prompts_path.read_text())
    tokenizer, model, eos = embedded_bf16()
    sampler = mathrl_sampler(system, tokenizer, model, eos)

    def run(ps: list[list[int]], max_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        if system == "hf":
            return hf_generate(model, tokenizer, eos, ps, max_tokens, temperature, seed)
        row_seeds = None if len(set(map(tuple, ps))) < len(ps) else [seed * 1000 + i for i in range(len(ps))]
        comps = sampler.sample(ps, max_tokens=max_tokens, temperature=temperature, seed=seed, row_seeds=row_seeds)
        return [list(c.tokens_T) for c in comps]

    result: dict[str, Any] = {"threads": torch.get_num_threads(), **measure(run, prompts, workloads, reps)}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.write_text(json.dumps(result))


def alternate(prompts: dict[str, list[list[int]]], workloads: list[str], reps: int) -> str:
    """tok/s of ``mathrl`` (static_cache=auto) and ``mathrl_eager`` (off), alternating; a table."""
    tokenizer, model, eos = embedded_bf16()
    samplers = {system: mathrl_sampler(system, tokenizer, model, eos) for system in STATIC_CACHE}
    lines = ["| workload | mathrl tok/s (each call) | mathrl_eager tok/s (each call) | mathrl / mathrl_eager |",
             "|---|---|---|---|"]  # fmt: skip
    for name in workloads:
        ps, (_, _, max_tokens, temperature) = workload_prompts(prompts, name), WORKLOADS[name]
        seeds = list(range(len(ps)))
        rates: dict[str, list[float]] = {system: [] for system in samplers}
        for sampler in samplers.values():  # warm-up
            sampler.sample(ps[:4], max_tokens=max_tokens, temperature=temperature, seed=0, row_seeds=seeds[:4])
        for r in range(reps):
            order = list(samplers.items())
            for system, sampler in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                comps = sampler.sample(ps, max_tokens=max_tokens, temperature=temperature, seed=r, row_seeds=seeds)
                rates[system].append(sum(len(c.tokens_T) for c in comps) / (time.perf_counter() - t0))
        a, b = rates["mathrl"], rates["mathrl_eager"]
        lines.append(f"| {name} | {' '.join(f'{x:.0f}' for x in a)} | {' '.join(f'{x:.0f}' for x in b)} "
                     f"| {statistics.median(a) / statistics.median(b):.2f} |")  # fmt: skip
    return "\n".join(lines)


def hf_generate(model: Any, tokenizer: Any, eos: list[int], prompts: list[list[int]], max_tokens: int,
                temperature: float, seed: int) -> list[list[int]]:  # fmt: skip
    import torch

    length = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs |= {"temperature": temperature, "top_p": 1.0, "top_k": 0}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, eos_token_id=eos,
                             pad_token_id=pad, **kwargs)[:, length:].tolist()  # fmt: skip
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in out]


def vllm_run(prompts: dict[str, list[list[int]]], workloads: list[str], reps: int, log_path: Path) -> dict[str, Any]:
    import httpx

    from mathrl import vllm_cpu
    from mathrl.models import ensure_embedded_model

    port = vllm_cpu.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = vllm_cpu.launch(str(ensure_embedded_model()), port, log_path=log_path,
                           extra_args=["--served-model-name", SERVED, "--no-enable-chunked-prefill"])  # fmt: skip
    result: dict[str, Any] = {"env": {k: v for k, v in vllm_cpu.server_env().items() if k.startswith("VLLM_CPU")}}
    try:
        t0 = time.perf_counter()
        vllm_cpu.wait_ready(url, proc, timeout_s=900)
        result["startup_s"] = time.perf_counter() - t0

        def run(ps: list[list[int]], max_tokens: int, temperature: float, seed: int) -> list[list[int]]:
            body = {"model": SERVED, "prompt": ps, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": seed, "return_token_ids": True, "skip_special_tokens": False}  # fmt: skip
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=1800)
            response.raise_for_status()
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            return [c["token_ids"] for c in choices]

        result |= measure(run, prompts, workloads, reps)
        result["peak_rss_gb"] = group_rss_gb(proc.pid)
    finally:
        vllm_cpu.stop(proc)
    return result


def group_rss_gb(pgid: int) -> float:
    """Resident memory of the process group now (vLLM's server and engine processes)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**30


# --- the hardware floor ----------------------------------------------------------------------------


def hardware() -> dict[str, float]:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    x = torch.randn(256 * 2**20, dtype=torch.bfloat16)  # 512 MB
    x.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        x.sum()
    bandwidth = 3 * x.numel() * 2 / (time.perf_counter() - t0)
    return {"matmul_flops": rate, "read_bytes_s": bandwidth}


def floor_ms(prompts: list[list[int]], max_tokens: int, hw: dict[str, float]) -> float:
    """Mean lower bound of one decode step over the run (all rows live, cache half filled)."""
    from transformers import AutoConfig

    from mathrl.models import ensure_embedded_model

    cfg = AutoConfig.from_pretrained(ensure_embedded_model())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    inner = cfg.hidden_size * head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) / head_dim
    per_layer = inner + 3 * cfg.hidden_size * cfg.intermediate_size
    params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    batch = len(prompts)
    context = statistics.fmean(map(len, prompts)) + max_tokens / 2
    kv_bytes = batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    flops = 2 * params * batch
    return 1000 * max(flops / hw["matmul_flops"], (2 * params + kv_bytes) / hw["read_bytes_s"])


# --- table --------------------------------------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    same = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        first = next((i for i in range(n) if x[i] != y[i]), n)
        prefix.append(first / max(n, 1))
    return same, statistics.fmean(prefix)


def table(results: dict[str, Any], prompts: dict[str, list[list[int]]]) -> str:
    lines = [
        "| workload | system | tokens/s | x vLLM | ms/step | floor ms/step | step/floor | TTFT s | peak RSS GB "
        "| rows identical to mathrl | shared prefix |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hw = results["hardware"]
    for name in results["workloads"]:
        ps, (_, _, max_tokens, temperature) = workload_prompts(prompts, name), WORKLOADS[name]
        floor = floor_ms(ps, max_tokens, hw)
        rates: dict[str, float] = {}
        for system in results["systems"]:
            r = results.get(system, {}).get(name)
            if r:
                rates[system] = statistics.median(x["tokens"] / x["wall_s"] for x in r["reps"])
        for system, rate in rates.items():
            r = results[system][name]
            step_ms = statistics.median(1000 * x["wall_s"] / x["steps"] for x in r["reps"])
            vs = f"{rate / rates['vllm']:.2f}" if "vllm" in rates else "-"
            agree = "-"
            if temperature == 0 and system != "mathrl" and "mathrl" in rates:
                same, prefix = agreement(results["mathrl"][name]["reps"][0]["outputs"], r["reps"][0]["outputs"])
                agree = f"{same:.2f} | {prefix:.3f}"
            else:
                agree = "- | -"
            lines.append(
                f"| {name} | {system} | {rate:.0f} | {vs} | {step_ms:.1f} | {floor:.1f} | {step_ms / floor:.1f} "
                f"| {r['ttft_s']:.2f} | {results[system].get('peak_rss_gb', 0):.2f} | {agree} |"
            )
    return "\n".join(lines) + (
        f"\n\nhardware, same run: bf16 matmul {hw['matmul_flops'] / 1e9:.0f} GFLOP/s, "
        f"read bandwidth {hw['read_bytes_s'] / 1e9:.1f} GB/s\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-generation")
    p.add_argument("--table", action="store_true", help="print the table of --out/results.json and stop")
    p.add_argument("--alternate", action="store_true", help="mathrl vs mathrl_eager in one process, alternating")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.table:
        results = json.loads((a.out / "results.json").read_text())
        print(table(results, json.loads((a.out / "prompts.json").read_text())))
        return
    systems, workloads = a.systems.split(","), a.workloads.split(",")
    for name, known in (*((s, SYSTEMS) for s in systems), *((w, WORKLOADS) for w in workloads)):
        if name not in known:
            p.error(f"unknown {name!r}; choose from {', '.join(known)}")
    if a.alternate:
        print(alternate(build_prompts(a.data_dir), workloads, a.reps))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        torch_worker(a.worker, a.out / "prompts.json", a.out / f"{a.worker}.json", workloads, a.reps)
        return

    def log(msg: str) -> None:
        print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)

    prompts = build_prompts(a.data_dir)
    (a.out / "prompts.json").write_text(json.dumps(prompts))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict[str, Any] = {"commit": git.stdout.strip(), "systems": systems, "workloads": workloads}
    log("hardware floor ...")
    results["hardware"] = hardware()
    for system in systems:
        log(f"{system} ...")
        if system == "vllm":
            from mathrl import vllm_cpu

            if not vllm_cpu.is_ready():
                log("vllm: skipped, no vLLM venv (build it: .venv/bin/python -m mathrl.vllm_cpu venv)")
                continue
            results["vllm"] = vllm_run(prompts, workloads, a.reps, a.out / "vllm.log")
        else:
            argv = [sys.executable, __file__, "--worker", system, "--out", str(a.out), "--reps", str(a.reps),
                    "--workloads", a.workloads]  # fmt: skip
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
            results[system] = json.loads((a.out / f"{system}.json").read_text())
        (a.out / "results.json").write_text(json.dumps(results))
    text = table(results, prompts)
    (a.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
