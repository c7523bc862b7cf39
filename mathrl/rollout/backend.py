"""Chat backends: conversations in, sampled assistant replies out.

``mathrl eval``, ``mathrl serve`` and ``mathrl distill`` need text generation, not
tokens and logprobs; a :class:`ChatBackend` gives them that whether the model runs in
this process (:class:`LocalBackend`, the fast :class:`TorchSampler`) or behind an
OpenAI-compatible HTTP endpoint (:mod:`mathrl.rollout.openai_backend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mathrl.models import eos_token_ids, load_for_inference
from mathrl.prompts import render_prompt
from mathrl.rollout.sampler import TorchSampler
from mathrl.types import FinishReason, Message


@dataclass(frozen=True)
class Sample:
    """One sampled reply: its text, how many tokens it took, why it ended."""

    text: str
    num_tokens: int
    finish_reason: FinishReason


class ChatBackend(Protocol):
    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """``n`` replies to each conversation (``result[i][j]``: conversation i, sample j).

        With ``seeds``, sample j of conversation i is drawn from its own stream seeded
        ``seeds[i] + j``: the same reply however the conversations are batched or split
        (what evaluation needs to resume exactly). Without, ``seed`` seeds the call."""
        ...


class LocalBackend:
    """Generation in this process with the KV-cache sampler and the model's chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 256):
        self.tokenizer = tokenizer
        self.sampler = TorchSampler(model, eos_token_ids(tokenizer), int(tokenizer.pad_token_id), max_batch=max_batch)

    @classmethod
    def load(cls, model_name: str, dtype: torch.dtype = torch.bfloat16, max_batch: int = 256) -> LocalBackend:
        """A hub id, a local HF directory, the embedded model, or a mathrl checkpoint/run."""
        model, tokenizer = load_for_inference(model_name, dtype)
        return cls(model, tokenizer, max_batch=max_batch)

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        rendered = [render_prompt(self.tokenizer, conv) for conv in conversations]
        prompts = [p for p in rendered for _ in range(n)]
        row_seeds = [seeds[i] + j for i in range(len(conversations)) for j in range(n)] if seeds else None
        completions = self.sampler.sample(
            prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, row_seeds=row_seeds
        )
        samples = [
            Sample(
                str(self.tokenizer.decode(list(c.tokens_T), skip_special_tokens=True)),
                len(c.tokens_T),
                c.finish_reason,
            )
            for c in completions
        ]
        return [samples[i * n : (i + 1) * n] for i in range(len(conversations))]
