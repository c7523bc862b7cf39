"""Scale-out on one CPU box: the main job with its sampler in-process, on ``mathrl serve``, on a real
vLLM (CPU build), and one step off-policy; and generation throughput, mathrl's sampler vs vLLM. One run.

    .venv/bin/python bench/scale_out.py                   # everything, ~25-40 min on 2 cores
    .venv/bin/python bench/scale_out.py --quick           # 3 steps per run, shakes out the plumbing
    .venv/bin/python bench/scale_out.py --runs a,d --parts train --out /tmp/so

Part 1, the main job (``mathrl train`` with its defaults: arithmetic, the embedded SmolLM2-135M,
30 steps, LoRA r32, 8 x 16 samples, 16 tokens, greedy held-out eval of 200 problems every 10
steps), four ways, each its own ``mathrl train`` process:
  (a) ``sampler=local``: TorchSampler on a bf16 copy of the policy, LoRA merged after each update;
  (b) ``sampler=remote`` against ``mathrl serve dtype=bf16`` (the local sampler's dtype) of the
      embedded model; ``max_batch=256`` (the local TorchSampler's chunk, so a step's 128 samples
      are one model call on both sides), adapters pushed every step;
  (c) ``sampler=remote`` against vLLM-CPU 0.32 (``mathrl.vllm_cpu``: its own venv, bf16, both
      cores bound), ``--logprobs-mode processed_logprobs`` when this vLLM accepts the flag, and
      ``--no-enable-chunked-prefill``: vllm-cpu 0.32's engine dies ("CPU Generator does not use
      offset", gpu_model_runner._bookkeeping_sync) when a seeded request's prefill is split across
      engine steps, which its default 2048-token budget does to a main-job step (128 x ~60
      prompt tokens) and the RemoteSampler always sends a seed. Run last: vLLM-CPU applies LoRA
      with per-token copies of the adapter weights (lora/ops/torch_ops), which makes it slow;
  (d) ``sampler=local max_off_policy_steps=1``: batch i+1 is sampled (one thread) while batch i
      trains.
In (b) and (c) the server and the trainer share the same cores. Servers run one at a time and
are stopped before the next run (always: try/finally, whole process group). A run still going
after --train-timeout is stopped and its steps so far are reported.
Per run: median ``time/step`` over steps 3..29 (0-based; steps 10 and 20 include an eval),
medians of ``time/sample``, ``time/train``, ``time/wait_for_samples``, mean ``time/eval``, test
accuracy (greedy, ``test/env/all/correct``) at steps 0/10/20/30 with the final 95% CI, mean
``optim/kl_sample_train_v1`` and ``optim/staleness_mean``, wall time, ratios to (a). Conditions:
1-min load average at the trainer's start and end, and CPU-seconds over the trainer's lifetime
split into trainer / server / everything else on the machine (/proc/stat minus ours). Before each
measured item the bench waits (up to --quiet-timeout) for the machine to be idle.

Part 2, generation throughput on the same token-id prompts, base weights (no adapter):
  (i)  bench-arith's batch (bench/grpo_step.py: "What is x + y?" x 16 seeded problems, the user
       turn rendered by mathrl's Renderer) x 4 samples x 16 new tokens, temperature 1;
  (ii) the first 32 GSM8K test problems (../shared/data, rendered as bench/eval_throughput.py
       does) x 128 new tokens, greedy.
mathrl: ``TorchSampler`` on a bf16 copy of the embedded model, built as ``mathrl train``'s
``_make_sampler`` builds it, called as training calls it ((i): identical prompts repeated, one
seed) and as evaluation calls it ((ii): per-row seeds), in its own process. vLLM: one batched
``/v1/completions`` request (token-id prompts, ``n``, ``return_token_ids``, ``logprobs: 0``: the
RemoteSampler's payload), after a warm-up request of the same shape. Neither side can be forced to
skip end-of-turn equally (TorchSampler has no ``ignore_eos``), so tokens/s counts the tokens each
actually generated (end-of-turn token included). Each is timed --reps times (median reported);
(i) is also timed on vLLM with a fresh LoRA r32 adapter loaded (what training samples with).

Writes ``--out``/tables.md and ``--out``/results.json (raw numbers, every metrics row of every
run), the runs' log_paths under ``--out``/runs and server/trainer logs under ``--out``/logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MATHRL = [sys.executable, "-m", "mathrl"]
SERVED_NAME = "smollm2"
SERVE_ARGS = ["dtype=bf16", "max_batch=256"]
RUNS: dict[str, str] = {
    "a": "sampler=local",
    "b": "sampler=remote, mathrl serve (bf16)",
    "c": "sampler=remote, vLLM-CPU",
    "d": "sampler=local, max_off_policy_steps=1",
}
ARITH_GROUPS, ARITH_N, ARITH_TOKENS = 16, 4, 16
GSM8K_PROMPTS, GSM8K_TOKENS = 32, 128
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# CPU accounting: who used the cores while a run ran
# --------------------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def group_cpu_s(pgid: int) -> float:
    """CPU-seconds of the live processes of process group ``pgid`` (and the children they reaped)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[2]) == pgid:  # fields after the name: state ppid pgrp ...; utime=14, stime=15 (1-based)
            total += sum(int(x) for x in rest[11:15]) / CLK_TCK  # utime stime cutime cstime
    return total


def own_cpu_s() -> tuple[float, float]:
    """(this process, its reaped children) CPU-seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def wait_quiet(threshold: float, timeout_s: float, log: Any) -> dict[str, float]:
    """Wait until the machine's busy share over 5 s is below ``threshold`` (of all cores)."""
    t0 = time.time()
    while True:
        b0 = machine_busy_s()
        time.sleep(5)
        share = (machine_busy_s() - b0) / (5 * NCPU)
        if share < threshold:
            return {"waited_s": time.time() - t0, "busy_share": share, "quiet": True}
        if time.time() - t0 > timeout_s:
            log(f"  machine still {share:.0%} busy after {timeout_s:.0f}s of waiting; measuring anyway")
            return {"waited_s": time.time() - t0, "busy_share": share, "quiet": False}


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------


def wait_health(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; log tail:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        if time.time() > deadline:
            raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f}s (log: {log_path})")
        time.sleep(1)


def vllm_flags(python: Path) -> dict[str, Any]:
    """Which of the flags this bench wants this vLLM's api_server accepts (from its ``--help``)."""
    help_text = subprocess.run(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--help"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
    ).stdout  # fmt: skip
    return {
        "logprobs_mode_processed": "--logprobs-mode" in help_text and "processed_logprobs" in help_text,
        "no_chunked_prefill": "--no-enable-chunked-prefill" in help_text,
    }


class Server:
    """One inference server for the duration of a ``with`` block: started, waited for, always stopped."""

    def __init__(self, kind: str, log_path: Path, vllm_extra: list[str]):
        self.kind, self.log_path, self.vllm_extra = kind, log_path, vllm_extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {"kind": kind}

    def __enter__(self) -> Server:
        from mathrl import vllm_cpu

        port = vllm_cpu.free_port()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        if self.kind == "mathrl":
            argv = [*MATHRL, "serve", f"port={port}", f"served_model_name={SERVED_NAME}", *SERVE_ARGS]
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            self.info["argv"] = argv
        else:
            from mathrl.models import ensure_embedded_model

            python = vllm_cpu.ensure_venv()
            extra = ["--served-model-name", SERVED_NAME, *self.vllm_extra]
            self.proc = vllm_cpu.launch(str(ensure_embedded_model()), port, python=python,
                                        log_path=self.log_path, extra_args=extra)  # fmt: skip
            env = vllm_cpu.server_env()
            self.info["env"] = {k: v for k, v in env.items() if k.startswith("VLLM_")}
            self.info["extra_args"] = extra
        try:
            wait_health(self.url, self.proc, self.log_path, timeout_s=900)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.info["startup_s"] = time.time() - t0
        if self.kind == "vllm":
            lines = self.log_path.read_text(errors="replace").splitlines()
            self.info["omp_binding"] = [ln.strip() for ln in lines if "core ids=" in ln or "reserve_cpu_num" in ln]
        return self

    def cpu_s(self) -> float:
        assert self.proc is not None
        return group_cpu_s(self.proc.pid)

    def __exit__(self, *exc: Any) -> None:
        from mathrl import vllm_cpu

        if self.proc is not None:
            vllm_cpu.stop(self.proc)  # SIGTERM the group, then SIGKILL what is left
            self.proc = None


# --------------------------------------------------------------------------------------------
# part 1: the main job four ways
# --------------------------------------------------------------------------------------------


def train_args(run: str, log_path: Path, quick: bool, url: str | None) -> list[str]:
    args = [f"log_path={log_path}", "save_rollouts=false"]
    if quick:
        args += ["max_steps=3", "eval_every=0"]
    if run in ("b", "c"):
        args += ["sampler=remote", f"base_url={url}/v1", f"api_model={SERVED_NAME}"]
    if run == "d":
        args += ["max_off_policy_steps=1"]
    return args


def run_train(run: str, out: Path, a: argparse.Namespace, vllm_extra: list[str], log: Any) -> dict[str, Any]:
    log_path = out / "runs" / f"{run}"
    if log_path.exists():
        raise RuntimeError(f"{log_path} exists: a reused log_path would resume; pick a new --out")
    quiet = wait_quiet(a.quiet_threshold, a.quiet_timeout, log)
    kind = {"b": "mathrl", "c": "vllm"}.get(run)
    server_cm: Any = Server(kind, out / "logs" / f"server-{run}.log", vllm_extra) if kind else contextlib.nullcontext()
    result: dict[str, Any] = {"run": run, "what": RUNS[run], "quiet_wait": quiet}
    with server_cm as server:
        if server is not None:
            result["server"] = server.info
            log(f"  {kind} server ready in {server.info['startup_s']:.0f}s at {server.url}")
        argv = [*MATHRL, "train", *train_args(run, log_path, a.quick, server.url if server else None)]
        result["argv"] = argv
        load0, busy0, (me0, kids0) = os.getloadavg(), machine_busy_s(), own_cpu_s()
        srv0 = server.cpu_s() if server else 0.0
        t0 = time.time()
        with open(out / "logs" / f"train-{run}.log", "wb") as stdout:
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(timeout=a.train_timeout)
            except subprocess.TimeoutExpired:
                log(f"  still running after {a.train_timeout:.0f}s (--train-timeout): stopped; its steps so far count")
                result["timed_out"] = True
                code = 0
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        wall = time.time() - t0
        load1, busy1, (me1, kids1) = os.getloadavg(), machine_busy_s(), own_cpu_s()
        srv1 = server.cpu_s() if server else 0.0
    if code != 0:  # its steps so far are still summarised (marked partial in the tables)
        tail = (out / "logs" / f"train-{run}.log").read_text(errors="replace")[-3000:]
        result["error"] = f"mathrl train ({run}) exited with {code}:\n{tail}"
    trainer, srv, me = kids1 - kids0, srv1 - srv0, me1 - me0
    result |= {
        "wall_s": wall, "loadavg_start": load0, "loadavg_end": load1,
        "cpu_s": {"trainer": trainer, "server": srv, "bench": me,
                  "others": max(0.0, (busy1 - busy0) - trainer - srv - me), "machine": busy1 - busy0},
    }  # fmt: skip
    metrics = log_path / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    result["rows"] = rows
    result["summary"] = summarize(rows)
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in rows if "time/step" in r]
    first = 3 if len(steps) > 4 else 1  # the main job: steps 3..29; --quick: all but the first
    timed = [r for r in steps if r["step"] >= first]

    def med(key: str) -> float:
        vals = [r[key] for r in timed if key in r]
        return statistics.median(vals) if vals else float("nan")

    def mean(key: str, rs: list[dict[str, Any]] = steps) -> float:
        vals = [r[key] for r in rs if key in r]
        return statistics.fmean(vals) if vals else float("nan")

    evals = {
        int(r["step"]): {
            "correct": r["test/env/all/correct"], "ci_low": r.get("test/pass@1/ci_low"),
            "ci_high": r.get("test/pass@1/ci_high"), "time_eval": r.get("time/eval"),
        }
        for r in rows if "test/env/all/correct" in r
    }  # fmt: skip
    return {
        "steps": len(steps), "median_from_step": first,
        "time_step": med("time/step"), "time_sample": med("time/sample"), "time_train": med("time/train"),
        "time_wait_for_samples": med("time/wait_for_samples"),
        "time_eval_mean": statistics.fmean(e["time_eval"] for e in evals.values() if e["time_eval"] is not None)
        if any(e["time_eval"] is not None for e in evals.values()) else float("nan"),
        "evals": evals,
        "kl_sample_train_mean": mean("optim/kl_sample_train_v1"),
        "kl_sample_train_abs_mean": statistics.fmean(abs(r["optim/kl_sample_train_v1"]) for r in steps
                                                     if "optim/kl_sample_train_v1" in r)
        if any("optim/kl_sample_train_v1" in r for r in steps) else float("nan"),
        "staleness_mean": mean("optim/staleness_mean"),
        "train_correct_first5": mean("env/all/correct", steps[:5]),
        "train_correct_last5": mean("env/all/correct", steps[-5:]),
        "frac_is_capped_mean": mean("optim/frac_is_capped"),
        "peak_rss_gb": max((r.get("mem/peak_rss_gb", 0.0) for r in rows), default=float("nan")),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# part 2: generation throughput
# --------------------------------------------------------------------------------------------


def build_prompts(data_dir: str) -> dict[str, list[list[int]]]:
    """The token-id prompts of both workloads, rendered by mathrl's Renderer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grpo_step import problems, prompt_text  # bench-arith's problems (step 0)

    from mathrl.data.datasets import load_problems
    from mathrl.models import EMBEDDED_MODEL, load_tokenizer
    from mathrl.prompts import math_messages
    from mathrl.rollout.renderer import Renderer
    from mathrl.types import Message

    renderer = Renderer(load_tokenizer(EMBEDDED_MODEL))
    arith = [renderer.initial_tokens([Message("user", prompt_text(x, y))]) for x, y in problems(0)]
    gsm8k = load_problems("gsm8k", "test", data_dir=data_dir, limit=GSM8K_PROMPTS).problems
    return {"arith": arith, "gsm8k": [renderer.initial_tokens(math_messages(p.problem)) for p in gsm8k]}


def torch_worker(prompts_path: Path, out: Path, reps: int, adapter_dir: Path) -> None:
    """mathrl's in-process sampler as ``mathrl train`` builds it; also writes a fresh LoRA r32 adapter."""
    import torch

    from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_model, load_tokenizer, wrap_lora
    from mathrl.rollout.sampler import TorchSampler
    from mathrl.runtime import tune_allocator

    tune_allocator()  # what the mathrl command does at start-up
    prompts = json.loads(prompts_path.read_text())
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    sampler = TorchSampler(load_model(EMBEDDED_MODEL, torch.bfloat16), eos_token_ids(tokenizer),
                           tokenizer.pad_token_id, tokenizer=tokenizer)  # fmt: skip
    arith = [p for p in prompts["arith"] for _ in range(ARITH_N)]  # as run_groups asks: copies in a row
    gsm8k = prompts["gsm8k"]
    calls = {
        "arith": lambda seed: sampler.sample(arith, max_tokens=ARITH_TOKENS, temperature=1.0, seed=seed),
        "gsm8k": lambda seed: sampler.sample(gsm8k, max_tokens=GSM8K_TOKENS, temperature=0.0, seed=seed,
                                             row_seeds=list(range(len(gsm8k)))),
    }  # fmt: skip
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, call in calls.items():
        call(10_000)  # warm-up, same shape
        reps_out = []
        for r in range(reps):
            t0 = time.perf_counter()
            comps = call(r)
            wall = time.perf_counter() - t0
            tokens, finished = sum(len(c.tokens_T) for c in comps), sum(c.finish_reason == "stop" for c in comps)
            reps_out.append({"wall_s": wall, "tokens": tokens, "finished": finished, "rows": len(comps)})
        result[name] = reps_out
    torch.manual_seed(0)
    policy = wrap_lora(load_model(EMBEDDED_MODEL, torch.float32), 32)  # as the trainer's policy (B = 0)
    policy.save_pretrained(str(adapter_dir))  # type: ignore[operator]
    out.write_text(json.dumps(result))


def vllm_completions(url: str, model: str, prompts: list[list[int]], n: int, max_tokens: int,
                     temperature: float, seed: int) -> tuple[float, dict[str, Any]]:  # fmt: skip
    import httpx

    body = {
        "model": model, "prompt": prompts, "n": n, "max_tokens": max_tokens, "temperature": temperature,
        "seed": seed, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
    }  # fmt: skip
    t0 = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=1200)
    wall = time.perf_counter() - t0
    response.raise_for_status()
    choices = response.json()["choices"]
    assert len(choices) == len(prompts) * n, f"asked for {len(prompts) * n} choices, got {len(choices)}"
    return wall, {
        "wall_s": wall, "tokens": sum(len(c["token_ids"]) for c in choices),
        "finished": sum(c["finish_reason"] == "stop" for c in choices), "rows": len(choices),
    }  # fmt: skip


def run_throughput(out: Path, a: argparse.Namespace, vllm_extra: list[str], log: Any, result: dict[str, Any]) -> None:
    """Fills ``result`` as it goes, so what was measured survives a later failure."""
    import httpx

    prompts = build_prompts(a.data_dir)
    (out / "prompts.json").write_text(json.dumps(prompts))
    adapter = out / "lora_r32"
    result["prompt_tokens"] = {k: [len(p) for p in v] for k, v in prompts.items()}

    log("  mathrl TorchSampler (its own process) ...")
    result["mathrl_quiet_wait"] = wait_quiet(a.quiet_threshold, a.quiet_timeout, log)
    load0 = os.getloadavg()
    worker_out = out / "torch_sampler.json"
    proc = subprocess.run([sys.executable, __file__, "--worker", "torch", "--out", str(out),
                           "--reps", str(a.reps)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"torch sampler worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result["mathrl"] = json.loads(worker_out.read_text()) | {"loadavg": [load0, os.getloadavg()]}

    log("  vLLM-CPU ...")
    result["vllm_quiet_wait"] = wait_quiet(a.quiet_threshold, a.quiet_timeout, log)
    vllm: dict[str, Any] = result.setdefault("vllm", {})
    with Server("vllm", out / "logs" / "server-throughput.log", vllm_extra) as server:
        result["vllm_server"] = server.info
        vllm["loadavg_start"] = os.getloadavg()
        workloads = {  # name: (model, prompts, n, max_tokens, temperature)
            "arith": (SERVED_NAME, prompts["arith"], ARITH_N, ARITH_TOKENS, 1.0),
            "gsm8k": (SERVED_NAME, prompts["gsm8k"], 1, GSM8K_TOKENS, 0.0),
            # (i) again through a LoRA r32 adapter (B = 0: the base's outputs), as training samples
            "arith_lora": ("lora-r32", prompts["arith"], ARITH_N, ARITH_TOKENS, 1.0),
        }
        for name, (model, ps, n, tokens, temp) in workloads.items():
            if model == "lora-r32":
                body = {"lora_name": "lora-r32", "lora_path": str(adapter.resolve())}
                httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=600).raise_for_status()
            log(f"    {name} ...")
            t0 = time.perf_counter()
            vllm_completions(server.url, model, ps, n, tokens, temp, 10_000)  # warm-up, same shape
            vllm[f"{name}_warmup_s"] = time.perf_counter() - t0
            vllm[name] = [vllm_completions(server.url, model, ps, n, tokens, temp, r)[1] for r in range(a.reps)]
        vllm["loadavg_end"] = os.getloadavg()


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, spec)


def train_tables(results: dict[str, Any], quick: bool) -> str:
    runs = {k: v for k, v in sorted(results.get("train", {}).items()) if "summary" in v}
    if not runs:
        return ""
    base = runs.get("a")
    first = next(iter(runs.values()))["summary"]["median_from_step"]
    last = next(iter(runs.values()))["summary"]["steps"] - 1
    vllm_note = (
        "vLLM started with `--logprobs-mode processed_logprobs`"
        if results.get("vllm_flags", {}).get("logprobs_mode_processed")
        else "vLLM started without `--logprobs-mode` (flag not accepted)"
    )
    lines = [
        f"**Main job, four ways** (`mathrl train` defaults{', --quick: 3 steps, final eval only' if quick else ''}; "
        f"{NCPU} CPU cores shared by everything: in (b) and (c) the inference server runs on the same cores as "
        f"the trainer; (b) `mathrl serve {' '.join(SERVE_ARGS)}` (bf16 = the local sampler's dtype); (c) vLLM-CPU "
        f"0.32 bf16, {vllm_note}. Medians over steps {first}..{last}; steps 10 and 20 include an eval.)",
        "",
        "| run | sampler | step s | sample s | train s | wait s | eval s | wall s | step / (a) | wall / (a) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in runs.items():
        s = r["summary"]
        ratio = fmt(s["time_step"] / base["summary"]["time_step"]) if base else "-"
        wall_ratio = fmt(r["wall_s"] / base["wall_s"]) if base else "-"
        what = r["what"] + (f" (PARTIAL: {s['steps']} steps)" if "error" in r or r.get("timed_out") else "")
        lines.append(
            f"| ({k}) | {what} | {fmt(s['time_step'])} | {fmt(s['time_sample'])} | {fmt(s['time_train'])} | "
            f"{fmt(s['time_wait_for_samples'])} | {fmt(s['time_eval_mean'])} | {fmt(r['wall_s'], '.0f')} | "
            f"{ratio} | {wall_ratio} |"
        )
    eval_steps = sorted({st for r in runs.values() for st in r["summary"]["evals"]})
    lines += [
        "",
        "**Quality**: held-out greedy accuracy (`test/env/all/correct`, 200 problems) by step, the final one "
        "with its 95% CI; mean `optim/kl_sample_train_v1` (sampler minus trainer logprob per token) and "
        "`optim/staleness_mean` over all steps; training reward `env/all/correct`, mean of the first and last 5 steps.",
        "",
        "| run | " + " | ".join(f"test@{st}" for st in eval_steps) + " | final 95% CI | KL sample-train | "
        "staleness | train correct first5 -> last5 |",
        "|---|" + "---:|" * len(eval_steps) + "---|---:|---:|---|",
    ]
    for k, r in runs.items():
        s = r["summary"]
        ev = s["evals"]
        final = ev.get(max(ev)) if ev else None
        ci = f"[{final['ci_low']:.3f}, {final['ci_high']:.3f}]" if final and final["ci_low"] is not None else "-"
        lines.append(
            f"| ({k}) | "
            + " | ".join(fmt(ev[st]["correct"], ".3f") if st in ev else "-" for st in eval_steps)
            + f" | {ci} | {fmt(s['kl_sample_train_mean'], '+.5f')} | {fmt(s['staleness_mean'])} | "
            f"{fmt(s['train_correct_first5'], '.3f')} -> {fmt(s['train_correct_last5'], '.3f')} |"
        )
    lines += [
        "",
        "**Conditions**: 1-min load average at the trainer's start and end; CPU-seconds while the trainer ran "
        "(trainer process; server process group; everything else on the machine = /proc/stat busy minus ours, "
        f"as average cores busy); server start-up time; idle wait before the run ({NCPU} cores = load {NCPU}).",
        "",
        "| run | load start | load end | trainer CPU-s | server CPU-s | others CPU-s (avg cores) | "
        "server start s | idle wait s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in runs.items():
        c = r["cpu_s"]
        srv = r.get("server", {})
        q = r["quiet_wait"]
        lines.append(
            f"| ({k}) | {r['loadavg_start'][0]:.2f} | {r['loadavg_end'][0]:.2f} | {c['trainer']:.0f} | "
            f"{c['server']:.0f} | {c['others']:.0f} ({c['others'] / r['wall_s']:.2f}) | "
            f"{fmt(srv.get('startup_s'), '.0f')} | {q['waited_s']:.0f}{'' if q['quiet'] else ' (not idle)'} |"
        )
    if "a" in runs and "d" in runs:
        fa, fd = runs["a"]["summary"]["evals"], runs["d"]["summary"]["evals"]
        if fa and fd:
            ea, ed = fa[max(fa)], fd[max(fd)]
            inside = ea["ci_low"] <= ed["correct"] <= ea["ci_high"] and ed["ci_low"] <= ea["correct"] <= ed["ci_high"]
            lines += ["", f"Off-policy check: final accuracy (d) {ed['correct']:.3f} vs (a) {ea['correct']:.3f}: "
                      + ("each inside the other's 95% CI." if inside else "OUTSIDE the other's 95% CI.")]  # fmt: skip
    return "\n".join(lines)


def throughput_table(results: dict[str, Any]) -> str:
    t = results.get("throughput")
    if not t or "mathrl" not in t:
        return ""
    plen = t["prompt_tokens"]
    rows = [
        ("(i) bench-arith: 16 prompts x 4 samples x 16 tokens, T=1", "arith", "arith"),
        ("(i) same, vLLM through a LoRA r32 adapter", "arith", "arith_lora"),
        ("(ii) GSM8K test: 32 prompts x 128 tokens, greedy", "gsm8k", "gsm8k"),
    ]
    m = t["mathrl"]
    lines = [
        f"**Generation throughput**, same token-id prompts (bench-arith prompts {min(plen['arith'])}-"
        f"{max(plen['arith'])} tokens; GSM8K {min(plen['gsm8k'])}-{max(plen['gsm8k'])}), base weights, bf16, "
        f"{NCPU} cores each, nothing else of ours running. mathrl = `TorchSampler` in-process ({m['threads']} "
        "torch threads); vLLM-CPU 0.32 = one batched `/v1/completions` request (HTTP included), after a warm-up. "
        "New tokens counted as generated (end-of-turn included; no ignore_eos on either side); median of "
        f"{len(m['arith'])} timed repetitions. The LoRA row's mathrl figures are the base's: mathrl samples "
        "from a copy with the adapter merged in, so an adapter costs it nothing at sampling time.",
        "",
        "| workload | mathrl tokens | mathrl s | mathrl tok/s | vLLM tokens | vLLM s | vLLM tok/s | vLLM / mathrl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def rate(reps: list[dict[str, Any]]) -> tuple[float, float, float]:
        wall = statistics.median(r["wall_s"] for r in reps)
        tokens = statistics.median(r["tokens"] for r in reps)
        return tokens, wall, statistics.median(r["tokens"] / r["wall_s"] for r in reps)

    for label, mk, vk in rows:
        if vk not in t.get("vllm", {}):
            continue
        mt, mw, mr = rate(m[mk])
        vt, vw, vr = rate(t["vllm"][vk])
        lines.append(f"| {label} | {mt:.0f} | {mw:.2f} | {mr:.0f} | {vt:.0f} | {vw:.2f} | {vr:.0f} | {vr / mr:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output directory (default runs/scale_out-<time>)")
    ap.add_argument("--quick", action="store_true", help="3 steps per run, final eval only, 1 repetition")
    ap.add_argument("--runs", default="a,b,c,d", help="which of the main job's runs: comma list of a,b,c,d")
    ap.add_argument("--parts", default="train,throughput", help="comma list of train, throughput")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per throughput measurement (3)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="before each item wait until the machine is less busy than this share of all cores",
    )
    ap.add_argument("--quiet-timeout", type=float, default=600, help="...but at most this many seconds")
    ap.add_argument("--train-timeout", type=float, default=3 * 3600, help="stop a main-job run after this many s")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.reps = a.reps or (1 if a.quick else 3)
    if a.worker == "torch":
        torch_worker(a.out / "prompts.json", a.out / "torch_sampler.json", a.reps, a.out / "lora_r32")
        return
    runs = [r for r in a.runs.split(",") if r]
    parts = [p for p in a.parts.split(",") if p]
    if unknown := [r for r in runs if r not in RUNS] + [p for p in parts if p not in ("train", "throughput")]:
        ap.error(f"unknown runs/parts: {unknown}")
    out = a.out or ROOT / "runs" / f"scale_out-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    out = out.resolve()

    def on_term(signum: int, frame: Any) -> None:  # finally blocks stop the servers
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)

    def log(msg: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv, "git": git.strip(), "host": platform.node(), "cpus": NCPU,
        "loadavg_at_start": os.getloadavg(), "train": {}, "errors": {},
    }  # fmt: skip
    vllm_extra: list[str] = []
    if ("c" in runs and "train" in parts) or "throughput" in parts:
        from mathrl import vllm_cpu

        flags = results["vllm_flags"] = vllm_flags(vllm_cpu.ensure_venv())
        if flags["logprobs_mode_processed"]:
            vllm_extra += ["--logprobs-mode", "processed_logprobs"]
        if flags["no_chunked_prefill"]:  # vllm-cpu 0.32 dies on a seeded request whose prefill is chunked
            vllm_extra += ["--no-enable-chunked-prefill"]
        log(f"vLLM flags accepted: {flags}; extra args: {vllm_extra}")

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    # (c) goes last: vLLM-CPU samples through LoRA adapters slowly, and the rest should not wait on it
    order: list[str] = [r for r in runs if r != "c"] if "train" in parts else []
    order += ["throughput"] if "throughput" in parts else []
    order += ["c"] if "c" in runs and "train" in parts else []
    t_all = time.time()
    try:
        for run in order:
            if run in RUNS:
                log(f"main job ({run}): {RUNS[run]} ...")
                try:
                    r = results["train"][run] = run_train(run, out, a, vllm_extra, log)
                    if "error" in r:
                        results["errors"][f"train-{run}"] = r["error"]
                        log(f"  FAILED (steps so far kept): {r['error']}")
                    s, ev = r["summary"], r["summary"]["evals"]
                    log(f"  done in {r['wall_s']:.0f}s: {s['steps']} steps, median step {s['time_step']:.2f}s, "
                        f"final test {ev[max(ev)]['correct'] if ev else float('nan'):.3f}, "
                        f"load {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}")  # fmt: skip
                except Exception:
                    results["errors"][f"train-{run}"] = traceback.format_exc()
                    log(f"  FAILED:\n{results['errors'][f'train-{run}']}")
                save()
            else:
                log("generation throughput ...")
                try:
                    run_throughput(out, a, vllm_extra, log, results.setdefault("throughput", {}))
                except Exception:
                    results["errors"]["throughput"] = traceback.format_exc()
                    log(f"  FAILED:\n{results['errors']['throughput']}")
                save()
    finally:
        results["loadavg_at_end"] = os.getloadavg()
        results["total_s"] = time.time() - t_all
        save()
    header = (
        f"bench/scale_out.py, {results['date']}, git {results['git']}, {NCPU} CPU cores, "
        f"total {results['total_s'] / 60:.1f} min; load average at start {results['loadavg_at_start'][0]:.2f}, "
        f"at end {results['loadavg_at_end'][0]:.2f}"
    )
    tables = "\n\n".join(x for x in (header, train_tables(results, a.quick), throughput_table(results)) if x)
    if results["errors"]:
        tables += "\n\nFAILED: " + ", ".join(results["errors"])
    (out / "tables.md").write_text(tables + "\n")
    print("\n" + tables)
    print(f"\nwritten: {out / 'tables.md'}, {out / 'results.json'}")
    if results["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
