"""Chat backends: conversations in, sampled assistant replies (or whole episodes) out.

``mathrl eval``, ``mathrl serve`` and ``mathrl distill`` need text generation, not
tokens and logprobs; a :class:`ChatBackend` gives them that whether the model runs in
this process (:class:`LocalBackend`, the fast :class:`TorchSampler`) or behind an
OpenAI-compatible HTTP endpoint (:mod:`mathrl.rollout.openai_backend`). Tool use is
:meth:`ChatBackend.run_episodes`: multi-turn episodes against envs, on token sequences
locally (:mod:`mathrl.rollout.runner`), message by message over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mathrl.envs.base import Env
from mathrl.models import eos_token_ids, load_for_inference
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.runner import run_episodes
from mathrl.rollout.sampler import Sampler, TorchSampler
from mathrl.tools.formats import Tool
from mathrl.types import FinishReason, Message, ToolCall


@dataclass(frozen=True)
class Sample:
    """One sampled reply: its text, how many tokens it took, why it ended; with tools, the
    calls parsed from it (``text`` is then the content before them)."""

    text: str
    num_tokens: int
    finish_reason: FinishReason
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Turn:
    """One turn of an episode: what the model wrote, its length and end, and the env's answer."""

    text: str
    num_tokens: int
    finish_reason: FinishReason
    reward: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)


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
        tools: Sequence[Sequence[Tool]] | None = None,
        stop: Sequence[str] = (),
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        """``n`` replies to each conversation (``result[i][j]``: conversation i, sample j).

        With ``seeds``, sample j of conversation i is drawn from its own stream seeded
        ``seeds[i] + j``: the same reply however the conversations are batched or split
        (what evaluation needs to resume exactly). Without, ``seed`` seeds the call.
        ``tools[i]``: tools conversation i may call (their calls come back parsed);
        ``stop``: strings that end a reply, left out of its text (OpenAI's ``stop``);
        ``on_done(i)``: called once conversation i has all its replies (a progress bar)."""
        ...

    def run_episodes(
        self,
        envs: Sequence[Env],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seeds: Sequence[int],
        max_turns: int,
    ) -> list[list[Turn]]:
        """One episode per env (closed at its end); episode i's turns draw from streams seeded
        from ``seeds[i]``, whatever it is batched with."""
        ...


class LocalBackend:
    """Generation in this process with the KV-cache sampler and the model's chat template."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch: int = 256,
        tool_parser: str = "auto",
        sampler: Sampler | None = None,
        prompt_format: str = "chat",
    ):
        """Generation with ``model`` in this process, or through ``sampler`` (e.g. the trainer's
        :class:`~mathrl.rollout.remote.RemoteSampler`) when given, with ``model`` only naming
        the context length. ``prompt_format``: see :data:`mathrl.prompts.PROMPT_FORMATS`."""
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, tool_parser, prompt_format)
        self.sampler: Sampler = sampler or TorchSampler(
            model, eos_token_ids(tokenizer), int(tokenizer.pad_token_id), max_batch=max_batch, tokenizer=tokenizer
        )
        self.max_context = context_length(model)

    @classmethod
    def load(
        cls,
        model_name: str,
        dtype: torch.dtype = torch.bfloat16,
        max_batch: int = 256,
        tool_parser: str = "auto",
        prompt_format: str = "chat",
    ) -> LocalBackend:
        """A hub id, a local HF directory, the embedded model, or a mathrl checkpoint/run."""
        model, tokenizer = load_for_inference(model_name, dtype, prompt_format)
        return cls(model, tokenizer, max_batch=max_batch, tool_parser=tool_parser, prompt_format=prompt_format)

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
        tools: Sequence[Sequence[Tool]] | None = None,
        stop: Sequence[str] = (),
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        toolsets = [tuple(t) for t in tools] if tools is not None else [()] * len(conversations)
        rendered = [self.renderer.initial_tokens(conv, ts) for conv, ts in zip(conversations, toolsets, strict=True)]
        prompts = [p for p in rendered for _ in range(n)]
        row_seeds = [seeds[i] + j for i in range(len(conversations)) for j in range(n)] if seeds else None
        stops = sorted({*stop, *(s for ts in toolsets for s in self.renderer.stop_strings(ts))})
        per_row = on_done is not None and isinstance(self.sampler, TorchSampler)  # others: all at the end
        progress = {"on_row_done": _per_conversation(on_done, n)} if on_done is not None and per_row else {}
        completions = self.sampler.sample(
            prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, row_seeds=row_seeds,
            stop=stops, **progress,
        )  # fmt: skip
        if on_done is not None and not progress:  # a sampler that cannot tell: all at once
            for i in range(len(conversations)):
                on_done(i)
        samples = []
        for k, c in enumerate(completions):
            action = self.renderer.parse(c, toolsets[k // n])
            text, calls = action.text, action.message.tool_calls
            if calls and not action.parse_errors:
                text = action.message.content
            else:
                calls = ()
                text = _cut_at_stop(text, stop)
            samples.append(Sample(text, len(c.tokens_T), c.finish_reason, calls))
        return [samples[i * n : (i + 1) * n] for i in range(len(conversations))]

    def run_episodes(
        self,
        envs: Sequence[Env],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seeds: Sequence[int],
        max_turns: int,
    ) -> list[list[Turn]]:
        trajectories = run_episodes(
            envs, self.sampler, self.renderer, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            row_seeds=seeds, max_turns=max_turns, max_context=self.max_context,
        )  # fmt: skip
        return [
            [
                Turn(t.ac_text, len(t.ac.tokens_T), t.ac.finish_reason, t.reward, t.metrics, t.logs)
                for t in traj.transitions
            ]
            for traj in trajectories
        ]


def _per_conversation(on_done: Callable[[int], None], n: int) -> Callable[[int], None]:
    """A per-row callback (row k is sample k % n of conversation k // n) that calls ``on_done(i)``
    once all ``n`` rows of conversation i have ended."""
    left: dict[int, int] = {}

    def row_done(k: int) -> None:
        i = k // n
        left[i] = left.get(i, n) - 1
        if left[i] == 0:
            on_done(i)

    return row_done


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string (OpenAI leaves the stop sequence out)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def context_length(model: PreTrainedModel) -> int | None:
    """The most positions the model takes (an episode stops before it outgrows them)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None
