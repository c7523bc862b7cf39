"""``mathrl serve``: an OpenAI-compatible server for any model mathrl can load, speaking vLLM's
dialect for RL trainers, so a remote-sampler client works unchanged against vLLM or this server.

Endpoints (request and response shapes are vLLM 0.32's unless a difference is listed below):
- ``POST /v1/chat/completions``: conversations in, replies out (non-streaming; tools below).
- ``POST /v1/completions``: prompts as token ids (a list of ints, or a list of such lists) or text
  (a string or a list of strings, tokenized without a chat template, ``add_special_tokens`` as
  vLLM); ``n``, ``max_tokens`` (default 16, as vLLM's), ``temperature``, ``top_p``, ``seed``,
  ``stop`` with ``include_stop_str_in_output``, ``stop_token_ids``, ``skip_special_tokens``,
  ``logprobs`` (0..20: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``),
  ``return_token_ids`` (per choice ``token_ids``: every generated id, and ``prompt_token_ids``),
  ``return_tokens_as_token_ids``. Choice ``i * n + j`` is prompt i's sample j; each choice has
  ``finish_reason`` ("stop"/"length") and vLLM's ``stop_reason`` (the stop string or stop token id
  that ended it, null for EOS or length). Text is cut as vLLM cuts it: before a stop string (after
  it with ``include_stop_str_in_output``), the EOS/stop token left out; ``token_ids`` keep every
  token up to the one that completed the stop string, EOS or stop token included.
- ``POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}``: a peft adapter
  (``save_pretrained`` output) merged into a copy of the served model, in the worker thread; requests
  then name it as ``model``. 200 with vLLM's text "Success: LoRA adapter 'x' added successfully.";
  a name in use is a 400 (unless ``load_inplace``), a bad ``lora_path`` (missing, not an adapter,
  half-written, another architecture) a 400 naming it and what is wrong, more than ``max_loras``
  adapters a 400 asking to unload one.
- ``POST /v1/unload_lora_adapter {"lora_name"}``: 200 "Success: LoRA adapter 'x' removed
  successfully."; an unknown name is vLLM's 404. Requests already queued for it still finish.
- ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``: the base
  model's weights replaced in place from DIR's ``*.safetensors`` (every parameter, shapes equal, else
  a 400 naming the tensor; dtypes are converted), between two model calls; loaded adapters are
  merged again onto the new weights. 200 ``{"results": [null]}``; another method is a 400 naming it.
- ``POST /reset_prefix_cache``: 200 ``{"success": true}``; nothing to reset (see below).
- ``GET /v1/models``: the base model and each adapter (``parent`` = the base's id, ``root`` = its
  path); ``GET /health``.
The three weight-changing endpoints are on when the server listens on loopback only; on another
address they answer 403 unless it was started with ``allow_weight_updates=true`` (vLLM offers them
only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` / ``VLLM_SERVER_DEV_MODE``): anyone who can reach the
port could otherwise swap the weights.

Every request field is either honoured or refused with a 400 naming it (chat: ``logprobs``,
penalties, ``logit_bias``, ``response_format``, ``tool_choice`` other than auto/none, ``stream``...;
completions: ``stream``, ``echo``, ``suffix``, ``best_of``, penalties, ``logit_bias``, ``top_k``,
``min_p``, ``min_tokens``, ``ignore_eos``, beam search, ``prompt_logprobs``...; any unknown field):
a client never gets a silently different result. Any OpenAI client works against it, and so do
:class:`mathrl.rollout.openai_backend.OpenAIBackend` (chat, for ``mathrl eval`` / ``distill``) and
:class:`mathrl.rollout.remote.RemoteSampler` (token ids and weight updates, for ``mathrl train``).

Tools (chat): a request's ``tools`` are rendered into the prompt (natively by a template with tool
support, else described in the system message in ``tool_parser``'s format, see
:mod:`mathrl.rollout.renderer`), ``role: "tool"`` messages and assistant ``tool_calls`` in the
history are accepted, and a reply that calls a tool comes back as OpenAI ``tool_calls`` with
``finish_reason: "tool_calls"``.

How generation is scheduled. The model is blocking torch code, so it runs in one dedicated worker
thread, never in the event loop, and a lock makes sure two model calls never overlap. Requests are
queued; each model call takes the oldest queued request and every other queued request of the same
kind (chat or completions), for the same model (base or adapter), with the same sampling settings
(``max_tokens``, ``temperature``, ``top_p``, stop strings), up to ``max_batch`` sequences, and serves
them all with ONE ``backend.generate`` / ``TorchSampler.sample`` call: on a CPU a batch of 8 costs
little more than a single prompt. Requests that arrive while the model is busy wait for the next
call; an idle server waits ``batch_window_ms`` after the first request so a burst of concurrent
requests shares one call. Adapter loads and weight reloads run in the same worker thread between
two calls, so they never change the weights under a running call.

What is guaranteed about reproducibility:
- temperature 0 (greedy) ignores the seed. The server never changes a request's own prompt, only
  what it is batched with. With ``dtype=fp32`` greedy replies were identical batched and unbatched in
  our tests; with ``dtype=bf16`` they can differ (the sampler computes the prefix shared by a batch
  once and pads the rest, and bf16 rounding depends on those shapes): prefer fp32 when exact
  reproducibility matters (on a CPU it is also the faster one).
- temperature > 0: every row draws from its own random stream, so its sample does not depend on
  what it is batched with: chat sample j of a request with seed s uses seed s + j; completions
  prompt i sample j uses s + i * n + j (one prompt: s + j, as chat). A request without a seed gets
  a random one. Same seed, same reply (up to the dtype note above).

Where mathrl serve differs from vLLM (0.32):
- Logprobs are those of the distribution sampled from (logits / temperature, then the top-p cut,
  renormalised; greedy: temperature 1), as :class:`~mathrl.rollout.sampler.TorchSampler` computes
  them: vLLM's default ``logprobs_mode=raw_logprobs`` returns the model's raw temperature-1 logprobs
  (its ``processed_logprobs`` mode is what this server returns). The ``top_logprobs`` alternatives
  (``logprobs`` >= 1) come from the same distribution, computed by one extra forward pass over each
  choice's tokens (so they cost time; ``logprobs: 0`` does not), and the sampled entry carries the
  sampler's own value. Token strings are ``tokenizer.decode([id])``; vLLM also repairs characters
  split across byte tokens and SentencePiece leading spaces.
- Seeds: vLLM seeds every prompt of a request with s (sample j: s + j), so two equal prompts in one
  request get equal samples; here prompt i sample j draws from s + i * n + j. Neither depends on
  batching; the random streams differ from vLLM's, so samples are not the same as vLLM's.
- Defaults are OpenAI's (temperature 1, top_p 1); vLLM takes them from the model's
  ``generation_config.json`` (``--generation-config auto``). Send them explicitly.
- ``stop_token_ids`` are applied after sampling: a row runs on to EOS or ``max_tokens`` (time
  only; what it returns is what stopping at the token gives, since each row's draws are its own).
- Adapters are merged into full copies of the model (exact, fast to sample from, but memory: one
  model per adapter); at most ``max_loras`` (default 4) are loaded, loading another is a 400 asking
  to unload one. vLLM keeps up to ``--max-loras`` on the GPU and swaps others in from CPU memory.
  A bad ``lora_path`` is a 400 here; vLLM answers 404 (missing path) or 500 (anything else).
- ``reload_weights`` needs every parameter in ``weights_path`` (vLLM loads a partial checkpoint
  with a warning) and takes no ``args`` or ``timeout``; an unknown ``collective_rpc`` method is a
  400 here (an error from the workers in vLLM).
- No prefix cache: every call prefills its prompts (a prompt shared by a call's rows once), so
  ``/reset_prefix_cache`` has nothing to do and ``cache_salt`` nothing to salt.
- Not implemented (a 400 naming the field): streaming, ``echo``, ``suffix``, ``best_of``,
  penalties, ``logit_bias``, ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, beam search,
  ``prompt_logprobs``, structured outputs, ``logprobs`` over 20 or -1. vLLM accepts unknown fields
  (logging a warning); this server refuses them. Errors have OpenAI's shape (``type``
  ``invalid_request_error``, ``code`` a string or null) where vLLM's carry ``type`` e.g.
  ``NotFoundError`` and the status as ``code``; the messages for an unknown model and adapter are vLLM's.
- Stop strings are found in the decoded text as vLLM finds them, but the sampler also ends a row
  early once its text decoded with special tokens contains one (those containing a special token's
  text are left to the check after sampling when ``skip_special_tokens``); a string that only
  overlaps a special token's text could end a row that vLLM would continue.

Layout: :mod:`.protocol` (the config, the request models, vLLM's defaults), :mod:`.registry` (the
models requests can name), :mod:`.chat` and :mod:`.completions` (each request kind: its checks, its
queued job, its response body), :mod:`.batching` (the queue and the model's worker thread),
:mod:`.weights` (adapter loads, weight reloads), :mod:`.app` (the routes, errors, request log, and
``serve``). Each imports only those before it; none imports torch or transformers at import time,
so ``mathrl serve --help`` stays fast.
"""

from mathrl.serve.app import _is_loopback as _is_loopback
from mathrl.serve.app import make_app, serve
from mathrl.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    LoadLoRAAdapterRequest,
    ServeConfig,
)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "InvalidRequest",
    "LoadLoRAAdapterRequest",
    "ServeConfig",
    "make_app",
    "serve",
]
