"""``/v1/completions`` (token ids in and out): the request checks, prompts, stop strings, the queued
job and its one ``TorchSampler.sample`` call per batch, and the choices cut and written as vLLM's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mathrl.serve.protocol import _LOGPROB_FLOOR, _MAX_LOGPROBS, CompletionRequest, InvalidRequest
from mathrl.serve.registry import _Model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mathrl.rollout.sampler import TorchSampler
    from mathrl.types import Completion

# --- queued completions requests -----------------------------------------------------------------


@dataclass(frozen=True)
class _TokenSettings:
    """What must be equal for two completions requests to share one sampler call."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]  # what the sampler stops at (see _sampler_stops)


@dataclass(frozen=True)
class _Output:
    """How a completions request wants its choices cut and written (changes no sampled token)."""

    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    include_stop: bool = False
    skip_special: bool = True
    logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_ids: bool = False


@dataclass(frozen=True)
class _Completed:
    """A completions request's choices and token counts."""

    choices: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    batch_requests: int


@dataclass
class _TokenJob:
    """A queued completions request: its prompts (token ids, or text tokenized in the worker)."""

    model: _Model
    prompts: list[list[int] | str]
    add_special_tokens: bool
    n: int
    seed: int
    settings: _TokenSettings
    output: _Output
    context: int | None  # the model's context length, when known
    future: asyncio.Future[Any]

    @property
    def key(self) -> tuple[Any, ...]:
        return ("tokens", self.model, self.settings)

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n

    def token_prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """The prompts as token ids (text tokenized now, in the worker thread), within the context."""
        prompts = []
        for i, p in enumerate(self.prompts):
            ids = p if isinstance(p, list) else list(tokenizer(p, add_special_tokens=self.add_special_tokens).input_ids)
            if not ids:
                raise InvalidRequest(f"prompt[{i}]: tokenizes to no tokens", "prompt")
            if self.context is not None and len(ids) + self.settings.max_tokens > self.context:
                raise InvalidRequest(
                    f"max_tokens: {self.settings.max_tokens} is too large: this model's maximum context length is "
                    f"{self.context} tokens and prompt {i} has {len(ids)} tokens",
                    "max_tokens",
                )
            prompts.append(ids)
        return prompts

    @staticmethod
    def generate(batch: Sequence[_TokenJob]) -> list[Any]:
        """One ``TorchSampler.sample`` call for the rows of every request of the batch (worker
        thread); prompt i sample j of a request seeded s draws from stream s + i * n + j."""
        model = batch[0].model
        sampler = model.sampler
        assert sampler is not None
        tokenizer = sampler.tokenizer
        prepared: list[list[list[int]] | InvalidRequest] = []
        rows: list[list[int]] = []
        seeds: list[int] = []
        for job in batch:
            try:
                prompts = job.token_prompts(tokenizer)
            except InvalidRequest as e:  # this request's mistake: the others of the call go on
                prepared.append(e)
                continue
            prepared.append(prompts)
            for i, p in enumerate(prompts):
                rows += [p] * job.n
                seeds += [job.seed + i * job.n + j for j in range(job.n)]
        s = batch[0].settings
        completions = (
            sampler.sample(
                rows, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=0, row_seeds=seeds,
                stop=list(s.stop),
            )
            if rows
            else []
        )  # fmt: skip
        results: list[Any] = []
        start = 0
        for job, ready in zip(batch, prepared, strict=True):
            if isinstance(ready, InvalidRequest):
                results.append(ready)
                continue
            end = start + len(ready) * job.n
            results.append(_complete(job, ready, completions[start:end], sampler, len(batch)))
            start = end
        return results


# --- completions requests ------------------------------------------------------------------------


def _check_completion(req: CompletionRequest, max_batch: int, max_tokens_limit: int) -> None:
    """What pydantic's field constraints do not express: fields at anything but their neutral value."""
    unsupported = {
        "stream": bool(req.stream),
        "stream_options": req.stream_options is not None,
        "echo": bool(req.echo),
        "suffix": req.suffix is not None,
        "best_of": req.best_of is not None and (req.best_of != 1 or req.n != 1),
        "logit_bias": bool(req.logit_bias),
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "repetition_penalty": req.repetition_penalty not in (None, 1.0),
        "top_k": req.top_k not in (None, 0, -1),
        "min_p": bool(req.min_p),
        "min_tokens": req.min_tokens != 0,
        "ignore_eos": req.ignore_eos,
        "use_beam_search": req.use_beam_search,
        "length_penalty": req.length_penalty != 1.0,
        "spaces_between_special_tokens": not req.spaces_between_special_tokens,
        "truncate_prompt_tokens": req.truncate_prompt_tokens is not None,
        "allowed_token_ids": req.allowed_token_ids is not None,
        "prompt_logprobs": req.prompt_logprobs is not None,
        "bad_words": bool(req.bad_words),
        "response_format": req.response_format is not None and req.response_format.get("type") != "text",
        "structured_outputs": req.structured_outputs is not None,
        "priority": req.priority != 0,
    }
    for name, used in unsupported.items():
        if used:
            raise InvalidRequest(f"{name}: not supported by this server; leave it out (or at its default)", name)
    if req.logprobs is not None and not 0 <= req.logprobs <= _MAX_LOGPROBS:
        raise InvalidRequest(
            f"logprobs: {req.logprobs} is not supported; this server returns 0 to {_MAX_LOGPROBS} top logprobs",
            "logprobs",
        )
    if req.n > max_batch:
        raise InvalidRequest(f"n: {req.n} is over this server's max_batch of {max_batch}", "n")
    if (req.max_tokens or 0) > max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens: {req.max_tokens} is over this server's limit of {max_tokens_limit}", "max_tokens"
        )
    if req.stop is not None and any(not s for s in ([req.stop] if isinstance(req.stop, str) else req.stop)):
        raise InvalidRequest("stop: stop strings must not be empty", "stop")


def _parse_prompts(raw: Any, vocab_size: int) -> list[list[int] | str]:
    """vLLM's prompt forms: token ids, a list of token-id lists, a string, a list of strings."""
    expected = "prompt: expected a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_token(t) for t in raw)):
        raw = [raw]  # one prompt
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(expected if raw != [] else "prompt: must not be empty", "prompt")
    prompts: list[list[int] | str] = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if not p:
                raise InvalidRequest(f"prompt[{i}]: must not be empty", "prompt")
            prompts.append(p)
        elif isinstance(p, list) and p and all(_is_token(t) for t in p):
            if (bad := next((t for t in p if not 0 <= t < vocab_size), None)) is not None:
                raise InvalidRequest(
                    f"prompt[{i}]: token id {bad} is out of vocabulary (0..{vocab_size - 1})", "prompt"
                )
            prompts.append([int(t) for t in p])
        else:
            raise InvalidRequest(expected if p != [] else f"prompt[{i}]: must not be empty", "prompt")
    if len({type(p) for p in prompts}) > 1:
        raise InvalidRequest(expected + ", not a mix", "prompt")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampler_stops(stop: Sequence[str], skip_special: bool, special_texts: Sequence[str]) -> tuple[str, ...]:
    """The stop strings the sampler may end rows at. It matches them in text decoded with special
    tokens, vLLM in the text it returns: with ``skip_special_tokens`` a stop string containing a
    special token's text never matches there, so the sampler must not stop at it either."""
    if not skip_special:
        return tuple(sorted(set(stop)))
    return tuple(sorted({s for s in stop if not any(t and t in s for t in special_texts)}))


class _Decoder:
    """Token ids to text as vLLM's detokenizer makes it: the prompt's last tokens as context (so a
    SentencePiece leading space survives), special tokens skipped or not, no space clean-up."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: Sequence[int], skip_special: bool):
        self.tokenizer, self.context, self.skip = tokenizer, list(prompt[-4:]), skip_special
        self.base = self._decode(self.context)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=self.skip, clean_up_tokenization_spaces=False))

    def __call__(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        full = self._decode([*self.context, *ids])
        return full[len(self.base) :] if full.startswith(self.base) else self._decode(ids)


def _first_stop(text: str, stop: Sequence[str]) -> tuple[str, int] | None:
    """The stop string that ends earliest in ``text`` (ties: the first listed) and where it starts."""
    best: tuple[int, str, int] | None = None
    for s in stop:
        start = text.find(s)
        if start >= 0 and (best is None or start + len(s) < best[0]):
            best = (start + len(s), s, start)
    return None if best is None else (best[1], best[2])


def _cut(
    tokens: Sequence[int], finish: str, text_of: Callable[[Sequence[int]], str], out: _Output, eos: frozenset[int]
) -> tuple[list[int], str, str, int | str | None]:
    """Where vLLM ends a sampled row: (token ids, text, finish_reason, stop_reason).

    An EOS or stop token ends it (kept in the ids, left out of the text unless
    ``include_stop_str_in_output``); a stop string ends it at the token that completes it (the ids
    keep that token, the text stops before the string or, with ``include_stop_str_in_output``, after it).
    """
    ids = list(tokens)
    stop_reason: int | str | None = None
    end = next((k for k, t in enumerate(ids) if t in eos or t in out.stop_token_ids), None)
    if end is not None:
        ids, finish = ids[: end + 1], "stop"
        stop_reason = None if ids[end] in eos else ids[end]
    shown = ids[:-1] if end is not None and not out.include_stop else ids
    text = text_of(shown)
    if out.stop and _first_stop(text, out.stop) is not None:
        lo, hi = 1, len(shown)  # the first prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(text_of(shown[:mid]), out.stop) is not None:
                hi = mid
            else:
                lo = mid + 1
        ids, text = ids[:lo], text_of(shown[:lo])
        hit = _first_stop(text, out.stop)
        assert hit is not None
        s, start = hit
        text = text[: start + len(s)] if out.include_stop else text[:start]
        finish, stop_reason = "stop", s
    return ids, text, finish, stop_reason


def _complete(
    job: _TokenJob, prompts: list[list[int]], completions: Sequence[Completion], sampler: TorchSampler, calls: int
) -> _Completed:
    """The choices of one completions request from its rows' completions (worker thread)."""
    tokenizer = sampler.tokenizer
    eos = frozenset(int(t) for t in sampler.eos_token_ids.tolist())
    out = job.output
    token_text: dict[int, str] = {}
    choices = []
    completion_tokens = 0
    for k, c in enumerate(completions):
        prompt = prompts[k // job.n]
        decoder = _Decoder(tokenizer, prompt, out.skip_special)
        ids, text, finish, stop_reason = _cut(c.tokens_T, c.finish_reason, decoder, out, eos)
        logprobs = None
        if out.logprobs is not None:
            top = (
                _top_logprobs(sampler.model, prompt, ids, out.logprobs, job.settings.temperature, job.settings.top_p)
                if out.logprobs > 0 and ids
                else None
            )
            logprobs = _logprobs_body(ids, c.logprobs_T[: len(ids)], top, tokenizer, token_text, out.tokens_as_ids)
        choices.append(
            {
                "index": k,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": ids if out.return_token_ids else None,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt if out.return_token_ids else None,
            }
        )
        completion_tokens += len(ids)
    return _Completed(choices, sum(len(p) for p in prompts), completion_tokens, calls)


def _top_logprobs(
    model: PreTrainedModel, prompt: Sequence[int], ids: Sequence[int], k: int, temperature: float, top_p: float
) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely tokens at each sampled position, with their logprobs in the distribution
    the sampler drew from (temperature, then top-p renormalised; greedy: temperature 1): one forward
    pass over the prompt and the sampled tokens."""
    import torch

    with torch.inference_mode():
        input_ids = torch.tensor([[*prompt, *ids[:-1]]], device=model.device)
        logits_TV = model(input_ids=input_ids, logits_to_keep=len(ids)).logits[0].float()
        if temperature > 0 and temperature != 1.0:
            logits_TV = logits_TV / temperature
        logp_TV = torch.log_softmax(logits_TV, dim=-1)
        if temperature > 0 and top_p < 1.0:
            logp_TV = _nucleus(logp_TV, top_p)
        values_TK, indices_TK = logp_TV.topk(k, dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(indices_TK.tolist(), values_TK.tolist(), strict=True)]


def _nucleus(logp_TV: torch.Tensor, top_p: float) -> torch.Tensor:
    """TorchSampler's top-p cut: keep the smallest set of most likely tokens whose mass reaches
    ``top_p`` and renormalise (the rest become -inf)."""
    import torch

    sorted_TV, order_TV = logp_TV.sort(dim=-1, descending=True)
    mass_before_TV = sorted_TV.exp().cumsum(dim=-1) - sorted_TV.exp()
    drop_TV = torch.zeros_like(logp_TV, dtype=torch.bool).scatter(-1, order_TV, mass_before_TV >= top_p)
    return torch.log_softmax(logp_TV.masked_fill(drop_TV, float("-inf")), dim=-1)


def _logprobs_body(
    ids: Sequence[int],
    logprobs: Sequence[float],
    top: list[list[tuple[int, float]]] | None,
    tokenizer: PreTrainedTokenizerBase,
    cache: dict[int, str],
    as_ids: bool,
) -> dict[str, Any]:
    """vLLM's completion ``logprobs`` object: each token's string, its logprob, a dict of the sampled
    token and the top alternatives (string -> logprob), and character offsets (sums of token lengths)."""

    def text(t: int) -> str:
        if as_ids:
            return f"token_id:{t}"
        if t not in cache:
            cache[t] = str(tokenizer.decode([t]))
        return cache[t]

    tokens = [text(t) for t in ids]
    token_logprobs = [max(lp, _LOGPROB_FLOOR) for lp in logprobs]
    top_logprobs = []
    for pos, (t, lp) in enumerate(zip(ids, token_logprobs, strict=True)):
        entry = {tokens[pos]: lp}
        for alt, alt_lp in top[pos] if top is not None else ():
            if alt != t:
                entry[text(alt)] = max(alt_lp, _LOGPROB_FLOOR)
        top_logprobs.append(entry)
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}
