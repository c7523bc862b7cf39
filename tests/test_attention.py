"""mathrl's grouped-query attention is transformers' eager attention without the K/V copies."""

import copy

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mathrl.attention import register
from mathrl.models import cache_kwarg


def _pair():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    eager = LlamaForCausalLM(config)
    eager.set_attn_implementation("eager")
    grouped = copy.deepcopy(eager)
    grouped.set_attn_implementation(register())
    return eager, grouped


def test_same_logits_with_padding_and_a_cache():
    eager, grouped = _pair()
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        for model in (eager, grouped):
            model.eval()
        assert torch.allclose(
            eager(ids, attention_mask=mask).logits, grouped(ids, attention_mask=mask).logits, atol=1e-6
        )
        caches = [DynamicCache(), DynamicCache()]
        for model, cache in zip((eager, grouped), caches, strict=True):
            model(ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
        step = torch.randint(3, 97, (3, 1))
        longer = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        a, b = (m(step, attention_mask=longer, use_cache=True, **{cache_kwarg(m): c}).logits
                for m, c in zip((eager, grouped), caches, strict=True))  # fmt: skip
        assert torch.allclose(a, b, atol=1e-6)


def test_same_gradients():
    eager, grouped = _pair()
    ids = torch.randint(3, 97, (2, 7))
    for model in (eager, grouped):
        model.train()
        torch.log_softmax(model(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), grouped.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
