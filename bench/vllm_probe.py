"""Probe a real vLLM (CPU build) server's HTTP API as a mathrl client would use it.

Starts the server on the embedded SmolLM2-135M model (see mathrl.vllm_cpu), sends the requests a
GRPO sampler client needs (token-id prompts, n>1, seeds, logprobs, stop strings, runtime LoRA
adapters, full-weight reloads, failures) and appends every request/response pair with its latency
to OUT/probe.jsonl; server logs go to OUT/server*.log. One server runs at a time; each section
starts its own (main, lora_mix with --max-loras 1 and 4, timing, prefix, errors, nodev).

    .venv/bin/python bench/vllm_probe.py --out /tmp/vllm_probe              # ~25 min on 2 idle cores
    .venv/bin/python bench/vllm_probe.py --out /tmp/vllm_probe --sections timing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from mathrl import vllm_cpu
from mathrl.models import ensure_embedded_model, load_tokenizer

QUESTION = "What is 12 + 30? Answer with the number only."


def chat_ids(model_dir: Path, question: str) -> list[int]:
    """The chat-templated prompt (system + user turn + assistant header) as token ids."""
    tok = load_tokenizer(str(model_dir))
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def make_artifacts(model_dir: Path, out: Path, prompt: list[int]) -> dict[str, Path]:
    """LoRA adapters (r=8 all-linear, lora_B ~ N(0, 0.4) so greedy outputs change; one r=64), a perturbed
    full model, a bf16 safetensors-only copy of it and a file with only layer 0's perturbed tensors.
    Also records transformers' fp32 greedy continuation of ``prompt`` for each, as a reference."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    refs: dict[str, list[int]] = {}
    ids = torch.tensor([prompt])

    def reference(name: str, model: torch.nn.Module) -> None:
        with torch.no_grad():
            refs[name] = model.generate(ids, max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()  # type: ignore[operator]

    reference("base", AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    paths: dict[str, Path] = {}
    for name, rank, seed in [("a0", 8, 0), ("a1", 8, 1), ("a2", 8, 2), ("big", 64, 3)]:
        path = paths[name] = out / f"lora_{name}"
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.4)
        peft_model.save_pretrained(path)
        reference(name, peft_model)
    path = paths["full"] = out / "full_perturbed"
    torch.manual_seed(10)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn_like(param) * param.std() * 0.1)
    model.save_pretrained(path)
    reference("full", model)
    tensors = load_file(path / "model.safetensors")
    paths["bare_bf16"] = out / "bare_bf16"  # the perturbed weights, bf16, no config/tokenizer files
    paths["bare_bf16"].mkdir(exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, paths["bare_bf16"] / "model.safetensors"
    )
    paths["layer0"] = out / "layer0_only"  # only model.layers.0.* (perturbed): a partial checkpoint
    paths["layer0"].mkdir(exist_ok=True)
    layer0 = {k: v.contiguous() for k, v in tensors.items() if k.startswith("model.layers.0.")}
    save_file(layer0, paths["layer0"] / "model.safetensors")
    with (out / "probe.jsonl").open("a") as f:
        f.write(json.dumps({"name": "hf_reference_greedy", "prompt": prompt, "greedy12": refs}) + "\n")
    print(f"hf reference greedy: {refs}", flush=True)
    return paths


class Recorder:
    def __init__(self, base_url: str, log: Path, keepalive: bool = False) -> None:
        # No keep-alive by default: after an unhandled server error (any failing /collective_rpc) uvicorn
        # drops the connection, and a pooled one then fails the next request with "connection reset".
        limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
        self.client = httpx.Client(base_url=base_url, timeout=600, limits=limits)
        self.log_path = log
        self.log = log.open("a")

    def __call__(self, name: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        start = time.monotonic()
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as err:  # recorded, not raised: the probe goes on
            entry = {"name": name, "method": method, "path": path, "request": body, "exception": repr(err)}
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()
            print(f"{name}: {err!r}", flush=True)
            return {}
        elapsed = time.monotonic() - start
        try:
            data: Any = response.json()
        except ValueError:
            data = response.text
        entry = {"name": name, "method": method, "path": path, "request": body, "status": response.status_code}
        entry |= {"elapsed_s": round(elapsed, 3), "response": data}
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        print(f"{name}: {response.status_code} in {elapsed:.2f}s: {json.dumps(data)[:300]}", flush=True)
        return data


def greedy_body(model: str, prompt: list[int]) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "return_token_ids": True,
        "logprobs": 1,
    }


def concurrent(rec: Recorder, calls: list[tuple[str, str, dict[str, Any]]], stagger_s: float = 0.0) -> None:
    """Send the requests at once (each on its own connection), ``stagger_s`` apart."""
    import threading

    def one(name: str, path: str, body: dict[str, Any]) -> None:
        try:
            Recorder(str(rec.client.base_url), rec.log_path)(name, "POST", path, body)
        except httpx.HTTPError as err:
            print(f"{name}: {err!r}", flush=True)

    threads = [threading.Thread(target=one, args=call) for call in calls]
    for thread in threads:
        thread.start()
        time.sleep(stagger_s)
    for thread in threads:
        thread.join()


def greedy(rec: Recorder, name: str, model: str, prompt: list[int]) -> list[int]:
    data = rec(name, "POST", "/v1/completions", greedy_body(model, prompt))
    return data["choices"][0]["token_ids"] if "choices" in data else []


def probe(model_dir: Path, out: Path, port: int) -> None:
    tok = load_tokenizer(str(model_dir))
    prompt, prompt2 = chat_ids(model_dir, QUESTION), chat_ids(model_dir, "Name a color.")
    arts = make_artifacts(model_dir, out, prompt)
    m = str(model_dir)
    # vLLM's default --max-loras 1 (launch() passes 4): the facts in the notes were measured with it.
    proc = vllm_cpu.launch(m, port, log_path=out / "server.log", extra_args=["--max-loras", "1"])
    start = time.monotonic()
    try:
        vllm_cpu.wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=600)
        print(f"ready after {time.monotonic() - start:.1f}s", flush=True)
        rec = Recorder(f"http://127.0.0.1:{port}", out / "probe.jsonl")
        rec("models", "GET", "/v1/models")
        base = {"model": m, "return_token_ids": True, "logprobs": 1}
        rec("first_request", "POST", "/v1/completions", {**base, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        rec("string_prompt", "POST", "/v1/completions", {**base, "prompt": QUESTION, "max_tokens": 4, "temperature": 0})
        rec("to_eos", "POST", "/v1/completions", {**base, "prompt": prompt, "max_tokens": 200, "temperature": 0})
        body = {**base, "prompt": prompt, "max_tokens": 200, "temperature": 0, "skip_special_tokens": False}
        rec("to_eos_keep_special", "POST", "/v1/completions", body)
        body = {**base, "prompt": [prompt, prompt2], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 7}
        rec("two_prompts_n2", "POST", "/v1/completions", body)
        body = {**base, "prompt": prompt2, "n": 4, "max_tokens": 10, "temperature": 1.0, "seed": 1234}
        rec("n4_seed_a", "POST", "/v1/completions", body)
        rec("n4_seed_b", "POST", "/v1/completions", body)
        rec("n4_noseed", "POST", "/v1/completions", {k: v for k, v in body.items() if k != "seed"})
        for temp in (0.5, 1.0):
            body = {**base, "prompt": prompt2, "max_tokens": 8, "temperature": temp, "seed": 3}
            data = rec(f"temp_{temp}", "POST", "/v1/completions", body)
            sampled = data["choices"][0]["token_ids"]
            body = {"model": m, "prompt": prompt2 + sampled, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0}
            rec(f"temp_{temp}_rescored", "POST", "/v1/completions", body)
            with torch.no_grad():  # the trainer's fp32 view of the same tokens
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                logits = hf(torch.tensor([prompt2 + sampled])).logits[0, len(prompt2) - 1 : -1].float()
                hf_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sampled)[:, None])[:, 0]
                hf_lp_t = torch.log_softmax(logits / temp, -1).gather(-1, torch.tensor(sampled)[:, None])[:, 0]
            print(f"temp {temp}: vllm {data['choices'][0]['logprobs']['token_logprobs']}", flush=True)
            print(f"  hf fp32 raw {hf_lp.tolist()}\n  hf fp32 /T {hf_lp_t.tolist()}", flush=True)
            with (out / "probe.jsonl").open("a") as f:
                entry = {"name": f"hf_logprobs_{temp}", "raw": hf_lp.tolist(), "tempered": hf_lp_t.tolist()}
                f.write(json.dumps(entry) + "\n")
        for include in (False, True):
            body = {**base, "prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": ["2", "\n"]}
            rec(f"stop_include_{include}", "POST", "/v1/completions", body | {"include_stop_str_in_output": include})
        rec("stop_token_ids", "POST", "/v1/completions", {**base, "prompt": prompt, "max_tokens": 30,
            "temperature": 0, "stop_token_ids": [tok.convert_tokens_to_ids("<|im_end|>")]})  # fmt: skip
        body = {**base, "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "min_tokens": 30}
        rec("ignore_eos", "POST", "/v1/completions", body)
        body = {**base, "prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": ["= 3"]}
        rec("stop_multitoken", "POST", "/v1/completions", body)
        rec("logprobs_0", "POST", "/v1/completions", {**base, "prompt": prompt, "max_tokens": 3, "logprobs": 0})
        rec("default_max_tokens", "POST", "/v1/completions", {"model": m, "prompt": prompt, "ignore_eos": True})
        rec("prompt_too_long", "POST", "/v1/completions", {**base, "prompt": prompt * 50, "max_tokens": 2})
        rec("too_long", "POST", "/v1/completions", {**base, "prompt": prompt, "max_tokens": 5000})
        rec("bad_token_id", "POST", "/v1/completions", {**base, "prompt": [999999], "max_tokens": 2})
        rec("empty_prompt", "POST", "/v1/completions", {**base, "prompt": [], "max_tokens": 2})

        # Timing: 64 prompts x 16 tokens in one request, and n=64 on one prompt.
        batch = {"model": m, "max_tokens": 16, "temperature": 1.0, "ignore_eos": True, "return_token_ids": True}
        rec("batch_64x16_list", "POST", "/v1/completions", batch | {"prompt": [prompt] * 64, "logprobs": 1})
        rec("batch_n64x16", "POST", "/v1/completions", batch | {"prompt": prompt, "n": 64, "logprobs": 1})

        # Seeded sampling alone vs. in a busy batch.
        seeded = {"model": m, "prompt": prompt2, "n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 99}
        seeded |= {"return_token_ids": True}
        rec("seeded_alone", "POST", "/v1/completions", seeded)
        noise = {"model": m, "prompt": [prompt] * 8, "max_tokens": 20, "temperature": 1.0, "ignore_eos": True}
        concurrent(rec, [("seeded_busy_noise", "/v1/completions", noise), ("seeded_busy", "/v1/completions", seeded)])

        # LoRA adapters.
        greedy(rec, "greedy_base", m, prompt)
        rec("lora_load_a0", "POST", "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": str(arts["a0"])})
        rec("models_after_lora", "GET", "/v1/models")
        greedy(rec, "greedy_a0", "a0", prompt)
        greedy(rec, "greedy_a0_repeat", "a0", prompt)
        rec("lora_load_a0_again", "POST", "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": str(arts["a0"])})
        body = {"lora_name": "a0", "lora_path": str(arts["a2"]), "load_inplace": True}
        rec("lora_load_a0_inplace_a2", "POST", "/v1/load_lora_adapter", body)
        greedy(rec, "greedy_a0_inplace_is_a2", "a0", prompt)
        body = {"lora_name": "a0", "lora_path": str(arts["a0"]), "load_inplace": True}
        rec("lora_load_a0_inplace_back", "POST", "/v1/load_lora_adapter", body)
        greedy(rec, "greedy_a0_inplace_back", "a0", prompt)
        rec("lora_load_badpath", "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(out / "nope")})
        rec("lora_load_rank64", "POST", "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(arts["big"])})
        rec("lora_load_a1", "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(arts["a1"])})
        rec("lora_load_a2", "POST", "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(arts["a2"])})
        rec("models_after_3", "GET", "/v1/models")
        for name in ("a0", "a1", "a2", "a0", "a0"):
            greedy(rec, f"greedy_{name}_with3", name, prompt)
        jobs = [(f"concurrent_{n}", n) for n in ("a0", "a1", "a2", m)]
        concurrent(rec, [(name, "/v1/completions", greedy_body(model, prompt)) for name, model in jobs])
        body = {"model": "a0", "prompt": [prompt] * 2, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        rec("lora_two_prompts", "POST", "/v1/completions", body)
        rec("batch_64x16_lora_a0", "POST", "/v1/completions", batch | {"model": "a0", "prompt": [prompt] * 64})
        rec("lora_unload_a0", "POST", "/v1/unload_lora_adapter", {"lora_name": "a0"})
        rec("lora_unload_a0_again", "POST", "/v1/unload_lora_adapter", {"lora_name": "a0"})
        greedy(rec, "greedy_a0_after_unload", "a0", prompt)
        rec("models_after_unload", "GET", "/v1/models")
        a0_as_a1 = {"lora_name": "a0", "lora_path": str(arts["a1"])}
        rec("lora_reload_a0_new_path", "POST", "/v1/load_lora_adapter", a0_as_a1)
        greedy(rec, "greedy_a0_is_a1_now", "a0", prompt)
        greedy(rec, "greedy_unknown_model", "nosuch", prompt)

        # Full weights.
        def reload(name: str, path: Path | None) -> None:
            kwargs = {} if path is None else {"weights_path": str(path)}
            rec(name, "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": kwargs})

        reload("reload_full_perturbed", arts["full"])
        greedy(rec, "greedy_after_reload_before_reset", m, prompt)
        rec("reset_prefix_cache", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_reload", m, prompt)
        greedy(rec, "greedy_a1_on_perturbed_base", "a1", prompt)
        rec("models_after_reload", "GET", "/v1/models")
        reload("reload_original", model_dir)
        rec("reset_prefix_cache_2", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_restore", m, prompt)
        reload("reload_bare_bf16", arts["bare_bf16"])
        rec("reset_prefix_cache_3", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_bare_bf16", m, prompt)
        reload("reload_no_path_after_bare", None)  # which path does it reload from now?
        rec("reset_prefix_cache_4", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_reload_no_path", m, prompt)
        reload("reload_original_2", model_dir)
        reload("reload_layer0_only", arts["layer0"])
        rec("reset_prefix_cache_5", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_layer0_only", m, prompt)
        reload("reload_original_3", model_dir)
        rec("reset_prefix_cache_6", "POST", "/reset_prefix_cache")
        greedy(rec, "greedy_after_restore_3", m, prompt)
        # A reload while a long request is decoding.
        long = {"model": m, "prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        long |= {"return_token_ids": True}
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(arts["full"])}}
        concurrent(rec, [("inflight_long", "/v1/completions", long), ("inflight_reload", "/collective_rpc", rpc)], 1.0)
        reload("reload_original_4", model_dir)
        rec("reset_prefix_cache_7", "POST", "/reset_prefix_cache")
    finally:
        vllm_cpu.stop(proc)


def probe_no_dev_mode(model_dir: Path, out: Path, port: int) -> None:
    """Which endpoints exist without VLLM_SERVER_DEV_MODE and VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    os.environ["VLLM_SERVER_DEV_MODE"] = "0"
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "False"
    proc = started(model_dir, port, out / "server_nodev.log")
    try:
        rec = Recorder(f"http://127.0.0.1:{port}", out / "probe.jsonl")
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(model_dir)}}
        rec("nodev_collective_rpc", "POST", "/collective_rpc", body)
        rec("nodev_reset_prefix_cache", "POST", "/reset_prefix_cache")
        lora = {"lora_name": "a0", "lora_path": str(out / "lora_a0")}
        rec("nolora_runtime_load", "POST", "/v1/load_lora_adapter", lora)
    finally:
        vllm_cpu.stop(proc)


def started(model_dir: Path, port: int, log: Path, extra_args: list[str] | None = None) -> subprocess.Popen[bytes]:
    start = time.monotonic()
    proc = vllm_cpu.launch(str(model_dir), port, log_path=log, extra_args=extra_args or [])
    try:
        vllm_cpu.wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=600)
    except BaseException:
        vllm_cpu.stop(proc)
        raise
    print(f"ready after {time.monotonic() - start:.1f}s", flush=True)
    return proc


def probe_lora_mix(model_dir: Path, out: Path, port: int, max_loras: int) -> None:
    """Concurrent requests to different adapters (and the base) with --max-loras N: right outputs? how fast?"""
    prompt = chat_ids(model_dir, QUESTION)
    m = str(model_dir)
    proc = started(model_dir, port, out / f"server_maxloras{max_loras}.log", ["--max-loras", str(max_loras)])
    tag = f"ml{max_loras}"
    try:
        rec = Recorder(f"http://127.0.0.1:{port}", out / "probe.jsonl")
        for name in ("a0", "a1", "a2"):
            rec(
                f"{tag}_load_{name}",
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": str(out / f"lora_{name}")},
            )
        ref = {name: greedy(rec, f"{tag}_seq_{name}", name, prompt) for name in (m, "a0", "a1", "a2")}
        groups = [[m, "a0"], [m, "a0"], ["a0", "a1"], [m, "a0", "a1", "a2"], [m, m]]
        for i, group in enumerate(groups):
            calls = [(f"{tag}_mix{i}_{name}", "/v1/completions", greedy_body(name, prompt)) for name in group]
            concurrent(rec, calls)
        with (out / "probe.jsonl").open() as f:
            entries = [json.loads(line) for line in f]
        for entry in entries:
            if entry["name"].startswith(f"{tag}_mix") and "choices" in entry.get("response", {}):
                model = entry["request"]["model"]
                got = entry["response"]["choices"][0]["token_ids"]
                verdict = "ok" if got == ref[model] else "WRONG: " + str([k for k, v in ref.items() if v == got])
                print(f"{entry['name']}: {verdict}", flush=True)
        batch = {"max_tokens": 16, "temperature": 1.0, "ignore_eos": True, "return_token_ids": True, "logprobs": 1}
        for name in (m, "a0"):
            short = "base" if name == m else name
            rec(
                f"{tag}_batch16x16_{short}", "POST", "/v1/completions", batch | {"model": name, "prompt": [prompt] * 16}
            )
            rec(
                f"{tag}_batch64x16_{short}", "POST", "/v1/completions", batch | {"model": name, "prompt": [prompt] * 64}
            )
    finally:
        vllm_cpu.stop(proc)


def probe_prefix_cache(model_dir: Path, out: Path, port: int) -> None:
    """Is a prompt's cached KV (computed with the old weights) reused after reload_weights?

    The CPU backend's KV block is 128 tokens and only full blocks are cached, so this uses a ~300-token prompt.
    """
    long_q = "Here is a list of numbers: " + ", ".join(str(i) for i in range(100)) + ". What is 12 + 30?"
    prompt = chat_ids(model_dir, long_q)
    m = str(model_dir)
    proc = started(model_dir, port, out / "server_prefix.log")
    try:
        rec = Recorder(f"http://127.0.0.1:{port}", out / "probe.jsonl")
        print(f"long prompt: {len(prompt)} tokens", flush=True)
        greedy(rec, "pc_base_1", m, prompt)
        greedy(rec, "pc_base_2_cached", m, prompt)
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(out / "full_perturbed")}}
        rec("pc_reload", "POST", "/collective_rpc", rpc)
        greedy(rec, "pc_after_reload_no_reset", m, prompt)
        rec("pc_reset", "POST", "/reset_prefix_cache")
        greedy(rec, "pc_after_reload_reset", m, prompt)
        greedy(rec, "pc_after_reload_reset_2", m, prompt)
        # The same question for an adapter replaced in place (load_inplace keeps the name).
        rec("pc_load_a0", "POST", "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": str(out / "lora_a0")})
        rec("pc_load_a2", "POST", "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(out / "lora_a2")})
        greedy(rec, "pc_a0_1", "a0", prompt)
        greedy(rec, "pc_a0_2_cached", "a0", prompt)
        greedy(rec, "pc_a2_reference", "a2", prompt)
        body = {"lora_name": "a0", "lora_path": str(out / "lora_a2"), "load_inplace": True}
        rec("pc_a0_inplace_a2", "POST", "/v1/load_lora_adapter", body)
        greedy(rec, "pc_a0_inplace_no_reset", "a0", prompt)
        rec("pc_reset_2", "POST", "/reset_prefix_cache")
        greedy(rec, "pc_a0_inplace_reset", "a0", prompt)
    finally:
        vllm_cpu.stop(proc)
    entries = {e["name"]: e for e in map(json.loads, (out / "probe.jsonl").read_text().splitlines())}
    names = ["pc_base_1", "pc_base_2_cached", "pc_after_reload_no_reset", "pc_after_reload_reset"]
    names += ["pc_a0_1", "pc_a0_2_cached", "pc_a2_reference", "pc_a0_inplace_no_reset", "pc_a0_inplace_reset"]
    for name in names:
        choice = entries[name]["response"]["choices"][0]
        print(f"{name}: {choice['token_ids']} {[round(x, 3) for x in choice['logprobs']['token_logprobs']]}")
    print(
        "prefix cache hit rates in the log:",
        sorted(set(re.findall(r"Prefix cache hit rate: [0-9.]+%", (out / "server_prefix.log").read_text()))),
    )


def probe_errors(model_dir: Path, out: Path, port: int) -> None:
    """Failing /collective_rpc calls: the response, the connection, the server and its weights afterwards."""
    prompt = chat_ids(model_dir, QUESTION)
    m = str(model_dir)
    proc = started(model_dir, port, out / "server_errors.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        rec = Recorder(base_url, out / "probe.jsonl")
        keep = Recorder(base_url, out / "probe.jsonl", keepalive=True)
        rec("version", "GET", "/version")
        rec("err_rpc_no_method", "POST", "/collective_rpc", {"kwargs": {}})
        rec("err_reset_get", "GET", "/reset_prefix_cache")
        greedy(rec, "err_greedy_before", m, prompt)
        keep("err_rpc_unknown_method", "POST", "/collective_rpc", {"method": "no_such_method"})
        keep("err_same_connection_after_500", "GET", "/health")
        rec("err_new_connection_health", "GET", "/health")
        greedy(rec, "err_greedy_after_unknown_method", m, prompt)
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(out / "does_not_exist")}}
        rec("err_reload_missing_dir", "POST", "/collective_rpc", rpc)
        rec("err_health_after_bad_reload", "GET", "/health")
        greedy(rec, "err_greedy_after_bad_reload", m, prompt)
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(model_dir)}}
        rec("err_reload_good_after_bad", "POST", "/collective_rpc", rpc)
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < 30:
            time.sleep(1)
        print(f"server exit code {proc.poll()} {time.monotonic() - start:.1f}s after the failed reload", flush=True)
        rec("err_health_at_the_end", "GET", "/health")
    finally:
        vllm_cpu.stop(proc)


def probe_timing(model_dir: Path, out: Path, port: int) -> None:
    """Latencies a client plans around (the machine's load average is recorded with them)."""
    prompt = chat_ids(model_dir, QUESTION)
    m = str(model_dir)
    start = time.monotonic()
    proc = started(model_dir, port, out / "server_timing.log")
    timings: dict[str, float | list[float]] = {"start_to_health_s": round(time.monotonic() - start, 1)}
    try:
        rec = Recorder(f"http://127.0.0.1:{port}", out / "probe.jsonl")

        def timed(key: str, path: str, body: dict[str, Any]) -> None:
            t = time.monotonic()
            rec(f"timing_{key}", "POST", path, body)
            timings[key] = round(time.monotonic() - t, 2)

        timed("first_request_16tok", "/v1/completions", greedy_body(m, prompt) | {"max_tokens": 16, "ignore_eos": True})
        timed(
            "second_request_16tok", "/v1/completions", greedy_body(m, prompt) | {"max_tokens": 16, "ignore_eos": True}
        )
        batch = {"model": m, "max_tokens": 16, "temperature": 1.0, "ignore_eos": True, "return_token_ids": True}
        batch |= {"logprobs": 1}
        timed("batch_64x16", "/v1/completions", batch | {"prompt": [prompt] * 64})
        timed("batch_64x16_again", "/v1/completions", batch | {"prompt": [prompt] * 64})
        timed("n64x16", "/v1/completions", batch | {"prompt": prompt, "n": 64})
        timed("lora_load", "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": str(out / "lora_a0")})
        timed("lora_16tok", "/v1/completions", greedy_body("a0", prompt) | {"max_tokens": 16, "ignore_eos": True})
        timed("lora_batch_64x16", "/v1/completions", batch | {"model": "a0", "prompt": [prompt] * 64})
        for i in range(3):
            rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(out / "full_perturbed")}}
            timed(f"reload_weights_{i}", "/collective_rpc", rpc)
            timed(f"reset_prefix_cache_{i}", "/reset_prefix_cache", {})
        timings["loadavg_1min_at_end"] = os.getloadavg()[0]
        print(f"timings: {timings}", flush=True)
        with (out / "probe.jsonl").open("a") as f:
            f.write(json.dumps({"name": "timings", "value": timings}) + "\n")
    finally:
        vllm_cpu.stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/vllm_probe"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--sections", default="main,lora_mix,timing,prefix,errors,nodev", help="comma-separated, in this order"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_embedded_model()
    port = args.port or vllm_cpu.free_port()
    start = time.monotonic()
    vllm_cpu.ensure_venv()
    print(f"venv ready in {time.monotonic() - start:.1f}s", flush=True)
    sections = args.sections.split(",")
    if "main" not in sections and not (args.out / "full_perturbed" / "model.safetensors").exists():
        make_artifacts(model_dir, args.out, chat_ids(model_dir, QUESTION))  # main makes them otherwise
    if "main" in sections:
        probe(model_dir, args.out, port)
    if "lora_mix" in sections:
        for max_loras in (1, 4):
            probe_lora_mix(model_dir, args.out, port, max_loras)
    if "timing" in sections:
        probe_timing(model_dir, args.out, port)
    if "prefix" in sections:
        probe_prefix_cache(model_dir, args.out, port)
    if "errors" in sections:
        probe_errors(model_dir, args.out, port)
    if "nodev" in sections:  # last: it changes os.environ
        probe_no_dev_mode(model_dir, args.out, port)


if __name__ == "__main__":
    main()
