"""Render chat messages to prompt tokens with the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mathrl.types import Message


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Tokens of ``messages`` followed by the assistant-turn header the model continues from."""
    tokens = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return list(tokens)
