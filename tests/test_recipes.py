"""Recipes (recipes/*.yaml) and the memory estimate (mathrl.memory).

Every recipe must load with ``mathrl train``'s own parser (a typo in a key fails here, not an
hour into a GPU job), name both launch commands in its header, and compute the step counts it
claims from the data. The estimate's parameter count must equal what transformers builds from
the same config, for each architecture variant it handles (a formula bug shows up here).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from mathrl.config import parse_config
from mathrl.envs.registry import env_options
from mathrl.memory import estimate, lora_param_count, param_count
from mathrl.models import wrap_lora
from mathrl.train.rl import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
TINY_CONFIGS = {
    "llama_gqa_untied": LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_tied_biases": LlamaConfig(**TINY, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "llama_head_dim": LlamaConfig(**TINY, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
    "mistral": MistralConfig(**TINY, num_key_value_heads=2, head_dim=16),
    "qwen2_qkv_bias": Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3_qk_norm": Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}


def qwen3_8b() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip


def llama31_8b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip


def run_kwargs(**over: object) -> dict:
    kw = dict(lora_rank=32, group_size=16, groups_per_batch=64, max_tokens=512, prompt_tokens=256,
              micro_batch_tokens=4096)  # fmt: skip
    return {**kw, **over}


# --- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_count_equals_the_built_model(name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name])
    assert param_count(TINY_CONFIGS[name]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen3_qk_norm", "qwen2_qkv_bias"])
def test_lora_count_equals_mathrls_adapters(name):
    torch.manual_seed(0)
    policy = wrap_lora(AutoModelForCausalLM.from_config(TINY_CONFIGS[name]), 8)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert lora_param_count(TINY_CONFIGS[name], 8) == trainable


def test_known_8b_parameter_counts():
    """The hand-checked sums of the module docstring (configs typed in, nothing downloaded)."""
    assert param_count(qwen3_8b()) == 8_190_735_360
    assert param_count(llama31_8b()) == 8_030_261_248


# --- memory -------------------------------------------------------------------------------------


def test_fsdp_shards_weights_and_optimizer_ddp_replicates():
    one = estimate(qwen3_8b(), **run_kwargs(world_size=1))
    ddp = estimate(qwen3_8b(), **run_kwargs(world_size=2, parallel="ddp"))
    fsdp = estimate(qwen3_8b(), **run_kwargs(world_size=2, parallel="fsdp"))
    assert ddp == one
    assert fsdp.weights == pytest.approx(one.weights / 2)
    assert fsdp.trainable == pytest.approx(one.trainable / 2)
    assert fsdp.activations == one.activations and fsdp.sampler == one.sampler
    assert one.weights == pytest.approx(8_190_735_360 * 2 / 1e9)  # bf16 frozen base under LoRA


def test_checkpointing_lowers_activations_and_remote_sampler_frees_its_copy():
    plain = estimate(llama31_8b(), **run_kwargs())
    ckpt = estimate(llama31_8b(), **run_kwargs(gradient_checkpointing=True))
    remote = estimate(llama31_8b(), **run_kwargs(sampler="remote"))
    assert ckpt.activations < plain.activations / 4
    assert remote.sampler == 0 < plain.sampler
    assert plain.sampler > plain.params * 2 / 1e9  # bf16 weights + a KV cache
    assert plain.total == pytest.approx(plain.weights + plain.trainable + plain.activations + plain.sampler)


def test_the_static_decoders_packed_weights_are_counted_for_long_answers():
    from mathrl import memory
    from mathrl.rollout.sampler import STATIC_MIN_TOKENS

    assert memory.STATIC_MIN_TOKENS == STATIC_MIN_TOKENS
    short = estimate(llama31_8b(), **run_kwargs(max_tokens=STATIC_MIN_TOKENS - 1, prompt_tokens=1))
    long = estimate(llama31_8b(), **run_kwargs(max_tokens=STATIC_MIN_TOKENS, prompt_tokens=0))
    assert long.sampler == pytest.approx(short.sampler + long.params * 2 / 1e9)  # same KV: 32 positions each


def test_full_fine_tuning_counts_fp32_weights_and_adam():
    full = estimate(llama31_8b(), **run_kwargs(lora_rank=0))
    assert full.trainable_params == full.params
    assert full.weights == pytest.approx(full.params * 6 / 1e9)  # fp32 master + autocast's bf16 copies
    assert full.trainable == pytest.approx(full.params * 12 / 1e9)  # fp32 gradient + 2 AdamW moments


def test_describe_is_one_line_with_every_part():
    line = estimate(qwen3_8b(), **run_kwargs()).describe()
    assert "\n" not in line and line.startswith("memory per GPU (estimate): weights 16.4 GB")
    for part in ("trainable+optimizer", "activations", "sampler", "-> ~"):
        assert part in line


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="parallel"):
        estimate(qwen3_8b(), **run_kwargs(parallel="zero3"))
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        estimate(qwen3_8b(), **run_kwargs(micro_batch_tokens=0))


def test_activation_estimate_is_near_what_autograd_keeps():
    """The fitted per-layer bytes stay within 35% of the tensors saved for the backward by a
    LoRA-wrapped model under bf16 autocast (as mathrl trains), LM head log-softmax included."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    policy = wrap_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), 8, autocast=True).train()
    base = policy.get_base_model()
    ids_BT = torch.randint(0, 512, (4, 128))
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden_BTH = base.model(input_ids=ids_BT).last_hidden_state
        torch.log_softmax(base.lm_head(hidden_BTH).float(), dim=-1)
    measured = sum(storages.values()) / 1e9
    est = estimate(config, **run_kwargs(lora_rank=8, max_tokens=1, prompt_tokens=0, micro_batch_tokens=4 * 128))
    assert est.activations == pytest.approx(measured, rel=0.35)


# --- recipes ------------------------------------------------------------------------------------


def load(path: Path) -> TrainConfig:
    return parse_config(TrainConfig, [f"config={path}"])


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def test_the_seed_recipes_are_all_there():
    names = {p.stem for p in RECIPES}
    assert names >= {"math_qwen3_8b", "gsm8k_llama31_8b", "gsm8k_llama31_8b_cheap", "arithmetic_llama32_1b",
                     "qwen3_4b_grpo_v1", "qwen3_4b_grpo_v2", "qwen3_4b_grpo_v3"}  # fmt: skip


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_valid_env_args(path):
    cfg = load(path)
    env_options(cfg.env, cfg.env_args)  # env_args typos fail here too
    assert cfg.log_path == f"runs/{path.stem}"
    assert cfg.max_steps > 0 and cfg.sampler == "local" and not cfg.base_url  # remote is a command-line choice


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_both_launch_commands(path):
    text = header(path)
    assert "One GPU" in text and "N GPUs" in text
    assert f"mathrl train config=recipes/{path.name}" in text  # one GPU
    assert (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True CUDA_VISIBLE_DEVICES=0 python -m vllm.entrypoints.openai.api_server"
        in (text)
    )
    assert "torchrun --standalone --nproc_per_node" in text and f"config=recipes/{path.name}" in text
    cfg = load(path)
    assert f"--model {cfg.model_name}" in text and f"api_model={cfg.model_name}" in text
    assert f"--max-lora-rank {cfg.lora_rank}" in text


def test_v3_continues_v2s_adapter():
    v2, v3 = (load(ROOT / "recipes" / f"qwen3_4b_grpo_{v}.yaml") for v in ("v2", "v3"))
    assert v3.load_checkpoint_path == v2.log_path and v3.load_checkpoint_mode == "continue"
    assert (v3.lora_rank, v3.lora_alpha, v3.model_name) == (v2.lora_rank, v2.lora_alpha, v2.model_name)
    assert v3.kl_penalty_coef == 0 and v3.learning_rate == 2e-5 and v3.log_path != v2.log_path


@needs_shared
def test_recipe_step_counts_match_the_data():
    """max_steps written in the recipes = epochs * problems / groups_per_batch, rounded up."""
    from mathrl.data.datasets import load_problems

    def problems(name: str, split: str, **filters: object) -> int:
        return len(load_problems(name, split, data_dir=str(SHARED), **filters).problems)  # type: ignore[arg-type]

    def steps(recipe: str) -> int:
        return load(ROOT / "recipes" / f"{recipe}.yaml").max_steps

    assert steps("math_qwen3_8b") == math.ceil(problems("math", "train_12k") / 64)
    assert steps("gsm8k_llama31_8b") == math.ceil(problems("gsm8k", "train") / 32)
    assert steps("gsm8k_llama31_8b_cheap") == math.ceil(problems("gsm8k", "train") / 64)
    assert steps("qwen3_4b_grpo_v1") == math.ceil(problems("math", "train") / 128)
    hard = problems("math", "train", levels=[4, 5])
    assert steps("qwen3_4b_grpo_v2") == math.ceil(2 * hard / 64)
    assert steps("qwen3_4b_grpo_v3") == math.ceil(hard / 64)
