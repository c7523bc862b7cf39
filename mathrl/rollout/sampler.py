"""The Sampler protocol and the in-process PyTorch sampler.

A sampler turns token prompts into completions with per-token logprobs. The trainer
only sees this protocol, so a faster backend (vLLM, an HTTP endpoint) can replace it.

``TorchSampler`` is a plain KV-cache decode loop over any transformers causal LM:
- identical prompts (the ``group_size`` copies of one problem) are prefilled once and
  their cache is fanned out, instead of recomputing the prompt G times; the prefix that
  all prompts of a batch share (system prompt, few-shot examples) is computed once;
- only the last position's logits are computed (``logits_to_keep=1``), never a full
  [tokens x vocab] tensor;
- randomness comes from a ``torch.Generator`` seeded per call, so a resumed run draws
  exactly the samples an uninterrupted one would;
- a row ends at an end-of-turn token or, when ``stop`` strings are given (the end of a
  tool call), once its decoded tail contains one of them;
- ``static_cache="auto"`` (the default): calls of ``STATIC_MIN_TOKENS`` tokens or more decode over a
  preallocated cache with prepacked weights and SDPA attention (:mod:`mathrl.rollout.static_cache`)
  when the model is one it implements (``MODEL_TYPES``); shorter calls and other models take transformers'
  forward with a DynamicCache, as do calls whose preallocated cache would take over half the free
  memory. ``on``: every call that fits; ``off``: never. ``MATHRL_STATIC_CACHE`` in the environment
  sets it for every command.
Logprobs are those of the distribution actually sampled from (logits / temperature);
at temperature 0 (greedy) they are the temperature-1 logprobs of the chosen token.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from mathrl.models import cache_kwarg
from mathrl.rollout.static_cache import StaticDecoder, fits, unsupported
from mathrl.types import Completion

STATIC_MIN_TOKENS = 32
"""With ``static_cache=auto``, calls of at least this many new tokens use the static-cache decoder
(shorter ones, like the main job's 16-token answers, would repack the weights after every update
for too few tokens to gain from it)."""


class Sampler(Protocol):
    """Token prompts in; sampled tokens, their logprobs and why each ended out; new weights in.

    Identical prompts in one call are one prompt sampled ``n`` times (prefilled once, sent
    once with ``n`` to a server). ``version`` is the weights version that samples now: the
    trainer tags every group with it to bound staleness (:mod:`mathrl.train.rl`).
    """

    version: int

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        top_p: float = 1.0,
        row_seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[Completion]: ...

    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Sample from ``policy``'s current weights from now on, as ``version``. Called on
        every rank (FSDP2 gathers its shards for it); only rank 0's sampler generates."""
        ...


class TorchSampler:
    """Batched sampling with a KV cache on the model it is given (e.g. a bf16 copy of the policy)."""

    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch: int = 256,
        tokenizer: Any = None,
        static_cache: str | None = None,
    ):
        static_cache = static_cache or os.environ.get("MATHRL_STATIC_CACHE", "auto")
        if static_cache not in ("auto", "on", "off"):
            raise ValueError(f"MATHRL_STATIC_CACHE / static_cache: expected auto, on or off, got {static_cache!r}")
        if static_cache == "on" and (reason := unsupported(model)) is not None:
            raise ValueError(f"static_cache=on: {reason}")
        self.model = model.eval()
        self.static_cache = static_cache
        self._decoder: StaticDecoder | None = None  # built on first use, rebuilt when the weights change
        self._decoder_key: tuple[int, ...] = ()
        self.eos_token_ids = torch.tensor(sorted(set(eos_token_ids)))
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch
        self.tokenizer = tokenizer  # decodes row tails for stop strings
        self.version = 0
        self._lock = threading.Lock()  # a weight update never lands in the middle of a sample call

    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Copy the policy's weights (LoRA merged) into this sampler's model."""
        from mathrl.models import sync_weights

        with self._lock:
            sync_weights(policy, self.model)  # in place: the static decoder sees the new version
            self.version = version

    def _static_decoder(self, max_tokens: int, batch: int, total: int) -> StaticDecoder | None:
        """The static-cache decoder for a call of ``batch`` rows x ``total`` slots, or None: the
        eager path."""
        if self.static_cache == "off" or (self.static_cache == "auto" and max_tokens < STATIC_MIN_TOKENS):
            return None
        if self.static_cache == "auto" and unsupported(self.model) is not None:
            return None
        if not fits(self.model, batch, total):
            return None
        key = _weights_key(self.model)
        if self._decoder is None or self._decoder_key != key:  # packed copies of other weights
            self._decoder = None  # one packed copy at a time
            self._decoder, self._decoder_key = StaticDecoder(self.model), key
        return self._decoder

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        top_p: float = 1.0,
        row_seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        on_row_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt. ``seed`` seeds one random stream for the whole call;
        with ``row_seeds`` each prompt draws from its own stream instead, so its sample does
        not depend on what else is in the batch (evaluation, serving). A row also ends once
        its text contains one of the ``stop`` strings (kept in the completion).
        ``on_row_done(i)`` is called as prompt i's row ends, while the others still decode
        (progress bars that move per problem, not per call)."""
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(prompts)} prompts")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need the sampler's tokenizer (TorchSampler(..., tokenizer=...))")
        with self._lock:
            return self._sample(prompts, max_tokens, temperature, seed, top_p, row_seeds, tuple(stop), on_row_done)

    def _sample(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float,
        seed: int,
        top_p: float,
        row_seeds: Sequence[int] | None,
        stop: tuple[str, ...],
        on_row_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        generator = torch.Generator().manual_seed(seed)
        results: list[Completion | None] = [None] * len(prompts)
        # Group identical prompts so each is prefilled once; chunk to bound memory.
        unique: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            unique.setdefault(tuple(p), []).append(i)
        chunks: list[list[tuple[tuple[int, ...], list[int]]]] = [[]]
        filled = longest = 0
        for item in unique.items():
            cost = (filled + len(item[1])) * max(longest, len(item[0])) ** 2  # the prefill's attention scores
            if chunks[-1] and (filled + len(item[1]) > self.max_batch or cost > _PREFILL_CELLS):
                chunks.append([])
                filled = longest = 0
            chunks[-1].append(item)
            filled += len(item[1])
            longest = max(longest, len(item[0]))
        for chunk in chunks:
            rows = (
                [torch.Generator().manual_seed(row_seeds[i] % 2**63) for _, ix in chunk for i in ix]
                if row_seeds is not None
                else None
            )
            flat = [i for _, ix in chunk for i in ix]  # the prompt index of each of the chunk's rows
            done = (lambda b, flat=flat: on_row_done(flat[b])) if on_row_done is not None else None
            outs = self._sample_chunk(chunk, max_tokens, temperature, top_p, rows or generator, stop, done)
            for (_, ix), comps in zip(chunk, outs, strict=True):
                for i, c in zip(ix, comps, strict=True):
                    results[i] = c
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _sample_chunk(
        self,
        chunk: list[tuple[tuple[int, ...], list[int]]],
        max_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | list[torch.Generator],
        stop: tuple[str, ...] = (),
        on_row_done: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        # Bookkeeping lives on the CPU; what the model reads is moved to its device.
        dev = self.model.device
        prompts = [p for p, _ in chunk]
        counts = torch.tensor([len(ix) for _, ix in chunk])
        cache = DynamicCache()
        # 1. The prefix all prompts share (system prompt, few-shot examples): computed once.
        shared = _common_prefix_length(prompts)
        if len(prompts) > 1 and shared > 0:
            self.model(
                input_ids=torch.tensor([prompts[0][:shared]], device=dev),
                **{cache_kwarg(self.model): cache},
                use_cache=True,
                logits_to_keep=1,
            )
            cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=dev))
        else:
            shared = 0
        # 2. The rest of each prompt, left-padded after the shared prefix: [U, S + L]
        rests = [p[shared:] for p in prompts]
        length = max(len(r) for r in rests)
        input_ids_UL = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask_UL = torch.zeros((len(prompts), shared + length), dtype=torch.long)
        mask_UL[:, :shared] = 1
        for u, r in enumerate(rests):
            input_ids_UL[u, length - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask_UL[u, shared + length - len(r) :] = 1
        positions_UL = (mask_UL.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        out = self.model(
            input_ids=input_ids_UL.to(dev),
            attention_mask=mask_UL.to(dev),
            position_ids=positions_UL.to(dev),
            **{cache_kwarg(self.model): cache},
            use_cache=True,
            logits_to_keep=1,
        )
        # Fan out each prompt's cache to its copies: [B, ...] with B = sum(counts)
        expand_B = torch.repeat_interleave(torch.arange(len(prompts)), counts)
        cache.batch_select_indices(expand_B.to(dev))
        logits_BV = out.logits[:, -1][expand_B.to(dev)]
        mask_BL = mask_UL[expand_B]
        next_pos_B = positions_UL[expand_B, -1] + 1
        batch = len(expand_B)
        del out  # it holds the prefill cache too
        decoder = self._static_decoder(max_tokens, batch, mask_BL.shape[1] + max_tokens)
        state = decoder.start(cache, mask_BL, max_tokens) if decoder is not None else None
        if state is not None:
            cache = DynamicCache()  # its tensors now live in the static cache
        tokens_BT = torch.full((batch, max_tokens), self.pad_token_id, dtype=torch.long)
        logprobs_BT = torch.zeros((batch, max_tokens))
        # Rows still decoding: ``live`` maps them to their output row. With per-row random
        # streams a finished row can leave the batch (no other row's draws depend on it):
        # once a quarter of the live rows are done, the cache is compacted to the rest.
        live = torch.arange(batch)
        done_L = torch.zeros(batch, dtype=torch.bool)
        ends_B = torch.full((batch,), -1, dtype=torch.long)  # length of each finished row
        window = max((len(s) for s in stop), default=0) + 8  # tokens: each is at least one character
        steps = 0
        for step in range(max_tokens):
            tok_L, lp_L = (t.cpu() for t in _draw(logits_BV, temperature, top_p, generator))
            tok_L = torch.where(done_L, self.pad_token_id, tok_L)
            tokens_BT[live, step] = tok_L
            logprobs_BT[live, step] = lp_L
            steps = step + 1
            ended_L = ~done_L & torch.isin(tok_L, self.eos_token_ids)
            if stop:
                ended_L |= ~done_L & self._hit_stop(tokens_BT[live, max(0, steps - window) : steps], stop)
            ends_B[live[ended_L]] = steps
            if on_row_done is not None:
                for b in live[ended_L].tolist():
                    on_row_done(b)
            done_L = done_L | ended_L
            if bool(done_L.all()) or step == max_tokens - 1:
                break
            if isinstance(generator, list) and int(done_L.sum()) * 4 >= len(live):
                keep = (~done_L).nonzero().squeeze(-1)
                if decoder is not None and state is not None:
                    decoder.select(state, keep)
                else:
                    cache.batch_select_indices(keep.to(dev))
                live, tok_L, done_L = live[keep], tok_L[keep], done_L[keep]
                mask_BL, next_pos_B = mask_BL[keep], next_pos_B[keep]
                generator = [generator[i] for i in keep.tolist()]
            if decoder is not None and state is not None:
                logits_BV = decoder.step(state, tok_L.to(dev), next_pos_B.to(dev))
            else:
                mask_BL = torch.cat([mask_BL, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
                out = self.model(
                    input_ids=tok_L[:, None].to(dev),
                    attention_mask=mask_BL.to(dev),
                    position_ids=next_pos_B[:, None].to(dev),
                    **{cache_kwarg(self.model): cache},
                    use_cache=True,
                )
                logits_BV = out.logits[:, -1]
            next_pos_B = next_pos_B + 1
        if on_row_done is not None:  # rows cut off at max_tokens end here
            for b in (ends_B < 0).nonzero().squeeze(-1).tolist():
                on_row_done(b)
        tokens_BT, logprobs_BT = tokens_BT[:, :steps], logprobs_BT[:, :steps]
        completions = [_to_completion(tokens_BT[b], logprobs_BT[b], int(ends_B[b])) for b in range(batch)]
        grouped, start = [], 0
        for c in counts.tolist():
            grouped.append(completions[start : start + c])
            start += c
        return grouped

    def _hit_stop(self, tails_LW: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        """Which rows' recent tokens decode to text containing a stop string."""
        texts = self.tokenizer.batch_decode(tails_LW.tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in text for s in stop) for text in texts], dtype=torch.bool)


_PREFILL_CELLS = 2**24
"""Prompts are prefilled together, left-padded to the longest: rows x length^2 is the size of
one head's attention scores. Past this a new chunk starts (measured: 64 rows padded to one
800-token prompt took 6+ GB), so one long multi-turn prompt does not pad all the others."""


def _weights_key(model: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever a weight is modified in place (autograd's version counters) or replaced
    (its storage): the static decoder holds packed copies, so any update (a training step's
    sync, ``mathrl serve``'s weight reload, ``p.data = ...``) must rebuild it."""
    params = list(model.parameters())
    return (id(model), sum(p._version for p in params), *(p.data_ptr() for p in params))


def _common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by all prompts, leaving each at least one own token."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


_DRAW_ROWS = 16  # rows per pass over the vocabulary: [16 x 49,152] fp32 stays in cache


def _draw(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B], logprobs [B]) of the sampled
    distribution (after temperature and the top-p nucleus cut, renormalised). With a list
    of generators, row b draws from generator b.

    Sampling is by inverse CDF: one uniform number per row, located in the cumulative
    probabilities. ``torch.multinomial`` draws one exponential number per vocabulary entry
    instead (49,152 per row here), which measured 67 ms per decode step at batch 64 on
    the CPU: more than the whole transformer forward. The vocabulary-wide passes are
    memory-bound, so they run on a few rows at a time (kept in cache) and as few as possible.
    """
    tokens, logprobs = [], []
    for s in range(0, len(logits_BV), _DRAW_ROWS):
        rows = generator[s : s + _DRAW_ROWS] if isinstance(generator, list) else generator
        tok_R, lp_R = _draw_rows(logits_BV[s : s + _DRAW_ROWS].float(), temperature, top_p, rows)
        tokens.append(tok_R)
        logprobs.append(lp_R)
    return torch.cat(tokens), torch.cat(logprobs)


def _draw_rows(
    logits_RV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature <= 0:
        tok_R = logits_RV.argmax(dim=-1)
        return tok_R, logits_RV.gather(-1, tok_R[:, None]).squeeze(-1) - torch.logsumexp(logits_RV, dim=-1)
    scaled_RV = logits_RV if temperature == 1.0 else logits_RV / temperature
    if top_p < 1.0:
        probs_RV = _nucleus(torch.log_softmax(scaled_RV, dim=-1), top_p).exp()
    else:
        probs_RV = torch.softmax(scaled_RV, dim=-1)
    cdf_RV = probs_RV.cumsum(dim=-1)
    if isinstance(generator, list):
        u_R = torch.cat([torch.rand(1, generator=g) for g in generator])
    else:
        u_R = torch.rand(len(logits_RV), generator=generator)
    u_R = u_R.to(logits_RV.device)  # CPU generators: the same draws on any device
    # right=True: the first entry whose cumulative mass exceeds u, never a zero-probability token
    tok_R = torch.searchsorted(cdf_RV, (u_R * cdf_RV[:, -1])[:, None], right=True).squeeze(-1)
    tok_R = tok_R.clamp(max=logits_RV.shape[-1] - 1)
    return tok_R, probs_RV.gather(-1, tok_R[:, None]).squeeze(-1).log()


def _nucleus(logp_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise."""
    sorted_BV, order_BV = logp_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.exp().cumsum(dim=-1) - sorted_BV.exp()
    drop_BV = torch.zeros_like(logp_BV, dtype=torch.bool).scatter(-1, order_BV, mass_before_BV >= top_p)
    return torch.log_softmax(logp_BV.masked_fill(drop_BV, float("-inf")), dim=-1)


def _to_completion(tokens_T: torch.Tensor, logprobs_T: torch.Tensor, end: int) -> Completion:
    """The row up to where it ended (the end-of-turn token or stop string kept: training
    must learn to stop); ``end`` < 0: it ran to ``max_tokens``."""
    if end >= 0:
        return Completion(tuple(tokens_T[:end].tolist()), tuple(logprobs_T[:end].tolist()), "stop")
    return Completion(tuple(tokens_T.tolist()), tuple(logprobs_T.tolist()), "length")
