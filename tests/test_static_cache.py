"""The static-cache decoder (mathrl.rollout.static_cache) against the eager path it replaces:
same greedy tokens and logprobs in fp32, rows finishing early and leaving the batch, per-row
seeds, weight updates, and the architectures it claims (Llama, Qwen2 biases, Qwen3 q/k norms)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mathrl.rollout.sampler import STATIC_MIN_TOKENS, TorchSampler
from mathrl.rollout.static_cache import unsupported

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [5, 6, 7, 8, 9], [3, 4, 5, 6]]
EOS = 1


def _both(model, prompts, **kwargs):
    eager = TorchSampler(model, [EOS], pad_token_id=0, static_cache="off").sample(prompts, **kwargs)
    static = TorchSampler(model, [EOS], pad_token_id=0, static_cache="on").sample(prompts, **kwargs)
    return eager, static


def _assert_same(eager, static, atol=1e-5):
    for e, s in zip(eager, static, strict=True):
        assert e.tokens_T == s.tokens_T and e.finish_reason == s.finish_reason
        assert torch.allclose(torch.tensor(e.logprobs_T), torch.tensor(s.logprobs_T), atol=atol)


def _qwen2(**extra):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, **extra,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for layer in model.model.layers:  # biases that matter (the init leaves them at zero)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def test_greedy_tokens_and_logprobs_equal_the_eager_path(tiny_model):
    eager, static = _both(tiny_model, PROMPTS, max_tokens=20, temperature=0.0, seed=0)
    _assert_same(eager, static)
    assert {c.finish_reason for c in eager} == {"stop", "length"}  # rows end early and run out


def test_rows_leaving_the_batch_keep_their_per_row_streams(tiny_model):
    prompts = PROMPTS * 4  # 20 rows: many finish early, the cache is compacted several times
    seeds = list(range(100, 120))
    eager, static = _both(tiny_model, prompts, max_tokens=40, temperature=1.0, seed=0, row_seeds=seeds)
    # Sampling by inverse CDF: a ~1e-7 difference in a probability moves a token only when the
    # uniform draw lands that close to a boundary; rows agree token for token up to such a draw.
    same = sum(e.tokens_T == s.tokens_T for e, s in zip(eager, static, strict=True))
    assert same >= len(prompts) - 2, same
    for e, s in zip(eager, static, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(e.tokens_T, s.tokens_T, strict=False)) if a != b), None)
        common = len(e.tokens_T) if n is None else n
        assert torch.allclose(torch.tensor(e.logprobs_T[:common]), torch.tensor(s.logprobs_T[:common]), atol=1e-5)
    assert len({len(c.tokens_T) for c in static}) > 3  # rows really ended at different steps
    alone = TorchSampler(tiny_model, [EOS], pad_token_id=0, static_cache="on")
    for i in (0, 7, 19):  # a row's sample does not depend on the rest of the batch (to rounding)
        single = alone.sample([prompts[i]], max_tokens=40, temperature=1.0, seed=0, row_seeds=[seeds[i]])
        _assert_same([single[0]], [static[i]])


def test_one_stream_with_top_p_matches_the_eager_path(tiny_model):
    eager, static = _both(tiny_model, PROMPTS, max_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    _assert_same(eager, static)


def test_a_weight_update_reaches_the_static_decoder(tiny_model):
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0, static_cache="on")
    before = sampler.sample(PROMPTS, max_tokens=12, temperature=0.0, seed=0)
    policy = LlamaForCausalLM(tiny_model.config).eval()
    policy.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.mul_(-3)
    sampler.model = LlamaForCausalLM(tiny_model.config).eval()
    sampler.model.load_state_dict(tiny_model.state_dict())
    sampler.update_weights(policy, version=1)
    after = sampler.sample(PROMPTS, max_tokens=12, temperature=0.0, seed=0)
    expected = TorchSampler(policy, [EOS], pad_token_id=0, static_cache="off").sample(
        PROMPTS, max_tokens=12, temperature=0.0, seed=0
    )
    _assert_same(expected, after)
    assert [c.tokens_T for c in after] != [c.tokens_T for c in before]


@pytest.mark.parametrize("extra", [{}, {"use_sliding_window": False, "sliding_window": 64}])
def test_qwen2_q_k_v_biases(extra):
    model = _qwen2(**extra)
    assert unsupported(model) is None
    eager, static = _both(model, PROMPTS, max_tokens=16, temperature=0.0, seed=0)
    _assert_same(eager, static)


def test_qwen3_q_k_norms():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.5)
            layer.self_attn.k_norm.weight.normal_(1, 0.5)
    eager, static = _both(model, PROMPTS, max_tokens=16, temperature=0.0, seed=0)
    _assert_same(eager, static)


def test_llama_rope_scaling_and_bf16():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    eager, static = _both(model, PROMPTS, max_tokens=16, temperature=0.0, seed=0)
    _assert_same(eager, static)
    bf16 = model.to(torch.bfloat16)
    eager, static = _both(bf16, PROMPTS, max_tokens=16, temperature=0.0, seed=0)
    agree = sum(e.tokens_T == s.tokens_T for e, s in zip(eager, static, strict=True))
    assert agree >= len(PROMPTS) - 1  # bf16 rounds differently in places; near-identical, not bit-equal


def test_unsupported_models_decode_eagerly_or_are_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, eos_token_id=1)).eval()
    assert unsupported(gpt2) == "GPT2LMHeadModel (model_type=gpt2) is not one of llama, mistral, qwen2, qwen3"
    auto = TorchSampler(gpt2, [EOS], pad_token_id=0, static_cache="auto")  # falls back to the eager path
    assert len(auto.sample([[5, 6]], max_tokens=STATIC_MIN_TOKENS, temperature=0.0, seed=0)[0].tokens_T) > 0
    with pytest.raises(ValueError, match=r"static_cache=on: GPT2LMHeadModel \(model_type=gpt2\) is not one of"):
        TorchSampler(gpt2, [EOS], pad_token_id=0, static_cache="on")
    sliding = _qwen2(use_sliding_window=True, sliding_window=4)
    assert unsupported(sliding) == "sliding-window attention"


def test_auto_uses_the_static_path_only_for_long_calls(tiny_model):
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)  # auto is the default
    sampler.sample(PROMPTS, max_tokens=STATIC_MIN_TOKENS - 1, temperature=0.0, seed=0)
    assert sampler._decoder is None  # the main job's 16-token answers: transformers' forward
    sampler.sample(PROMPTS, max_tokens=STATIC_MIN_TOKENS, temperature=0.0, seed=0)
    assert sampler._decoder is not None


def test_weights_changed_in_place_are_seen_without_update_weights(tiny_model):
    """``mathrl serve``'s /collective_rpc reload copies new tensors into the served model's
    parameters: the packed copies of the old ones must not keep answering."""
    model = LlamaForCausalLM(tiny_model.config).eval()
    model.load_state_dict(tiny_model.state_dict())
    sampler = TorchSampler(model, [EOS], pad_token_id=0, static_cache="on")
    before = sampler.sample(PROMPTS, max_tokens=12, temperature=0.0, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(-3)  # packed into the fused gate/up copy
    after = sampler.sample(PROMPTS, max_tokens=12, temperature=0.0, seed=0)
    expected = TorchSampler(model, [EOS], pad_token_id=0, static_cache="off").sample(
        PROMPTS, max_tokens=12, temperature=0.0, seed=0
    )
    _assert_same(expected, after)
    assert [c.tokens_T for c in after] != [c.tokens_T for c in before]


def test_the_environment_chooses_the_path_for_every_command(tiny_model, monkeypatch):
    monkeypatch.setenv("MATHRL_STATIC_CACHE", "auto")
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    sampler.sample(PROMPTS, max_tokens=STATIC_MIN_TOKENS, temperature=0.0, seed=0)
    assert sampler._decoder is not None
    monkeypatch.setenv("MATHRL_STATIC_CACHE", "off")
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    sampler.sample(PROMPTS, max_tokens=STATIC_MIN_TOKENS, temperature=0.0, seed=0)
    assert sampler._decoder is None
    monkeypatch.setenv("MATHRL_STATIC_CACHE", "fast")
    with pytest.raises(ValueError, match="MATHRL_STATIC_CACHE / static_cache: expected auto, on or off, got 'fast'"):
        TorchSampler(tiny_model, [EOS], pad_token_id=0)


def test_a_cache_too_large_for_free_memory_takes_the_growing_path(tiny_model, monkeypatch):
    from mathrl.rollout import static_cache

    assert static_cache.fits(tiny_model, len(PROMPTS), 45)
    assert static_cache.cache_bytes(tiny_model, 5, 45) == 2 * 2 * 5 * 2 * 45 * 8 * 4  # layers, k/v, rows, heads
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0, static_cache="on")
    monkeypatch.setattr(static_cache, "_free_memory", lambda device: 1000)  # bytes: nothing fits
    got = sampler.sample(PROMPTS, max_tokens=40, temperature=0.0, seed=0)
    assert sampler._decoder is None  # never built: the weights were not packed for nothing
    expected = TorchSampler(tiny_model, [EOS], pad_token_id=0, static_cache="off").sample(
        PROMPTS, max_tokens=40, temperature=0.0, seed=0
    )
    _assert_same(expected, got)


def test_unwritten_slots_are_never_read(tiny_model, monkeypatch):
    """The cache is not zeroed (fresh mappings happen to be zeros on Linux): fill every new
    buffer with NaN, which poisons any output that reads a slot before it is written."""
    from mathrl.rollout import static_cache

    real = static_cache._empty
    monkeypatch.setattr(static_cache, "_empty", lambda shape, like: real(shape, like).fill_(float("nan")))
    prompts = PROMPTS * 4  # rows leave: ``select`` copies into a fresh buffer too
    eager, static = _both(tiny_model, prompts, max_tokens=40, temperature=0.0, seed=0, row_seeds=list(range(20)))
    _assert_same(eager, static)


def test_long_padded_prompts_shared_prefixes_and_plain_multi_head_attention():
    """Past 512 slots (SDPA's CPU kernel splits the keys in blocks), a row padded by 600 slots,
    a prefix all prompts share (prefilled once), kv_heads == heads."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    shared = [7, 8, 9, 10]
    prompts = [shared + [3] * 600, [*shared, 4, 5], [*shared, 6]]
    eager, static = _both(model, prompts, max_tokens=40, temperature=0.0, seed=0)
    _assert_same(eager, static, atol=1e-4)


def test_the_huge_page_buffer_is_aligned_and_outlives_its_mapping_object():
    import gc
    import sys

    from mathrl.rollout.static_cache import _empty

    kv = _empty((3, 2, 5, 1 << 16), torch.empty(0, dtype=torch.bfloat16))
    assert kv.shape == (3, 2, 5, 1 << 16) and kv.dtype == torch.bfloat16 and kv.is_contiguous()
    if sys.platform == "linux":
        assert kv.data_ptr() % (2 << 20) == 0
    view = kv[1, 0]
    del kv
    gc.collect()
    view.fill_(3.0)  # the mapping is still there: no crash, the values stick
    assert float(view.sum()) == 3.0 * view.numel()
    on_meta = _empty((2, 3), torch.empty(0, device="meta"))  # not a CPU tensor: a plain allocation
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3)


@pytest.mark.parametrize("kind", ["granite", "smollm3"])
def test_lookalike_architectures_are_refused(kind):
    """They have q/k/v/o, gate/up/down and a rotary table, but compute something else (residual
    multipliers, rotary skipped in some layers): decoding them here would be silently wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    assert f"model_type={kind}" in unsupported(model)
    auto = TorchSampler(model, [EOS], pad_token_id=0)
    auto.sample(PROMPTS, max_tokens=STATIC_MIN_TOKENS, temperature=0.0, seed=0)
    assert auto._decoder is None
