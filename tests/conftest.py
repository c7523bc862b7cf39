"""Shared fixtures: a tiny random Llama built in the test (fast), and the embedded model (real)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Callable[..., Path]:
    """Make a directory holding a tiny random Llama with the embedded model's tokenizer (its
    chat template kept, or removed: a base model): ``tiny_llama_dir(name, chat_template=True)``."""
    from transformers import AutoTokenizer

    from mathrl.models import ensure_embedded_model

    def make(name: str, chat_template: bool = True) -> Path:
        tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
        if not chat_template:
            tokenizer.chat_template = None
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


# Fixtures that load the embedded model's weights (not just its tokenizer): a test using one is
# marked ``slow``, so ``pytest -m "not slow"`` is the quick loop.
REAL_MODEL_FIXTURES = {"local", "server", "tool_server", "reference", "direct", "uninterrupted"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
