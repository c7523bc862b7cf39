"""Decoding over a preallocated KV cache with prepacked weights: TorchSampler's fast path for
long generations (evaluation, distillation, serving, long RL rollouts) on Llama-family models.

Why: on a CPU a decode step is bound by memory traffic and per-op overhead, not FLOPs. Measured on
2 cores (2026-11-30, SmolLM2-135M bf16, batch 32, ~150-token GSM8K prompts): a bf16 ``linear``
whose weight is not in cache runs at 0.37 ms for 576x1536, the same weight prepacked once into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing
does) at 0.18 ms, at batch 32 and 64 alike; transformers' decode step (DynamicCache, which copies
the whole cache at every token, sdpa's CPU flash kernel at 0.9 ms per call for one query, ~40 ops
per layer) spends most of its time outside the matmuls. Here:

- the cache is one tensor ``[layers, 2 (keys, values), B, kv_heads, prompt + max_tokens,
  head_dim]``, written in place at one slot per step (no reallocation); a row that is padding or
  not yet written is masked by an additive bias ``[B, T]``. Each row's keys are contiguous in T
  (attention streams them); the write of one slot then touches B x kv_heads lines T x head_dim
  apart, so on Linux the buffer is mapped on 2 MB pages (``_empty``): with 4 KB pages the
  writes and reads miss the TLB (measured at batch 64 x 300 slots: a step 10% faster; a
  slot-major layout, whose write is one block, made attention 1.5x slower);
- q/k/v are one prepacked matmul, gate/up another; RMSNorm is ``F.rms_norm``; attention is
  ``scaled_dot_product_attention`` over the filled slots, the query heads that share a key/value
  head passed as that head's queries (no repeat of the cache, on any torch version):
  1.6 ms per layer at batch 64 x 300 slots, close to reading those keys and values at the
  machine's bandwidth, against 4.4 ms for baddbmm/softmax/bmm, which copy the sliced cache first;
- rows that finish leave the batch by index selection of the filled slots (``select``).

Prefill stays with transformers (prefix sharing, fan-out of a group's prompt): its DynamicCache is
copied into the static one once. Supported (``MODEL_TYPES``): Llama (SmolLM2), Mistral without a
sliding window, Qwen2 (q/k/v biases), Qwen3 (q/k norms), with a static rotary table; anything
else decodes on the eager path (``unsupported`` says why).

Not compiled: ``torch.compile`` (inductor, weights frozen, static shapes: attention over all T
slots, masked) of the step took 74-90 s to compile and then ran a step in 17 s instead of
0.2 s (2026-11-30, batch 64: the in-place write into the cache, a graph input, comes back as
copies of the whole buffer); of transformers' own decode step, 120 s to compile for no gain.
What is left of a step here is the weights' matmuls (~55%: oneDNN reads weights that are not in
cache at ~4 GB/s, under half the machine's read bandwidth) and attention's reads of the cache.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""Rotary types whose frequencies do not change with the sequence length."""


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""The architectures ``StaticDecoder.step`` implements (SmolLM2 is a llama). Others that look the same from
outside (SmolLM3 skips rotary in some layers, Granite scales its residuals and logits, Ernie 4.5
rotates interleaved pairs) would decode wrongly without an error, so this is an allow-list."""


def unsupported(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot decode here (None: it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    inner: Any = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if kind not in MODEL_TYPES or layers is None or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} (model_type={kind}) is not one of {', '.join(MODEL_TYPES)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rope_type={rope} (frequencies change with length)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act}"
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        if a.o_proj.bias is not None or m.down_proj.bias is not None or m.gate_proj.bias is not None:
            return "biases outside q/k/v"
        if len({p.bias is None for p in (a.q_proj, a.k_proj, a.v_proj)}) > 1:
            return "biases on some of q/k/v only"
        if hasattr(a, "q_norm") != hasattr(a, "k_norm"):
            return "a norm on q or k only"
    return None


def cache_bytes(model: PreTrainedModel, batch: int, total: int) -> int:
    """Bytes of a static cache of ``batch`` rows x ``total`` slots for ``model``."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * total * head_dim * itemsize


def fits(model: PreTrainedModel, batch: int, total: int) -> bool:
    """Whether the cache takes at most half the memory free on the model's device now. It is
    reserved up front (on 2 MB pages every row's slots are touched at the first write), where
    transformers' cache grows with the longest live row: a large batch x max_tokens (an eval at
    4,096 tokens, 256 rows: 25 GB for SmolLM2-135M) takes that path instead."""
    return cache_bytes(model, batch, total) <= _free_memory(next(model.parameters()).device) // 2


def _free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: on a CPU the kernel's MemAvailable, or less where a cgroup
    (a container, a Slurm job) caps this process; unknown: unlimited."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free = 2**62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # cgroup v2: this process's limit and what its group uses now
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def _prepack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout on a CPU (where oneDNN is built in); as is elsewhere."""
    weight = weight.detach().contiguous()
    if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    return weight


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


_HUGE_PAGE = 2 << 20


def _empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s dtype and device; on a Linux CPU, on 2 MB pages."""
    if like.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return like.new_empty(shape)
    nbytes = math.prod(shape) * like.element_size()
    try:  # private anonymous memory (a shared mapping would be shmem, which THP's madvise mode skips)
        buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return like.new_empty(shape)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # keeps ``buf`` mapped while the tensor lives
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start : start + nbytes].view(like.dtype).view(shape)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class StaticState:
    """One batch's cache: keys and values ``[layers, 2, B, kv_heads, T, head_dim]``, the additive
    mask ``[B, T]`` (0 where a row may attend, -inf on padding and unwritten slots), the next slot."""

    kv: torch.Tensor
    bias_BT: torch.Tensor
    slot: int


class StaticDecoder:
    """Decode steps of ``model`` (its weights as of construction) over a :class:`StaticState`."""

    def __init__(self, model: PreTrainedModel):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"static-cache decoding: {reason}")
        cfg, inner = model.config, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.intermediate = cfg.intermediate_size
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.head = _prepack(model.lm_head.weight)
        self.inv_freq = inner.rotary_emb.inv_freq.detach().float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        scale = self.head_dim**-0.5  # folded into q's weights (exact for power-of-two head sizes)
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            q_norm = a.q_norm.weight.detach() * scale if hasattr(a, "q_norm") else None
            q_scale = 1.0 if q_norm is not None else scale  # with a q norm, the scale goes after it
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            qkv_bias = None
            if all(b is not None for b in biases):
                qkv_bias = torch.cat([biases[0].detach() * q_scale, *(b.detach() for b in biases[1:])])
            self.layers.append(
                _Layer(
                    ln1=layer.input_layernorm.weight.detach(),
                    ln2=layer.post_attention_layernorm.weight.detach(),
                    qkv=_prepack(torch.cat([a.q_proj.weight * q_scale, a.k_proj.weight, a.v_proj.weight])),
                    qkv_bias=qkv_bias,
                    o=_prepack(a.o_proj.weight),
                    gate_up=_prepack(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                    down=_prepack(m.down_proj.weight),
                    q_norm=q_norm,
                    k_norm=a.k_norm.weight.detach() if hasattr(a, "k_norm") else None,
                )
            )

    def start(self, cache: DynamicCache, mask_BL: torch.Tensor, max_tokens: int) -> StaticState:
        """The prefilled ``cache`` (rows = ``mask_BL``'s) copied into a cache with room for
        ``max_tokens`` more positions."""
        batch, length = mask_BL.shape
        total = length + max_tokens
        first: Any = cache.layers[0]
        kv = _empty((len(self.layers), 2, batch, self.kv_heads, total, self.head_dim), first.keys)
        for i in range(len(self.layers)):  # slots past the prompt are written before they are read
            layer: Any = cache.layers[i]
            kv[i, 0, :, :, :length] = layer.keys
            kv[i, 1, :, :, :length] = layer.values
        bias_BT = torch.full((batch, total), float("-inf"), dtype=kv.dtype, device=kv.device)
        bias_BT[:, :length].masked_fill_(mask_BL.to(bias_BT.device).bool(), 0.0)
        return StaticState(kv, bias_BT, length)

    @staticmethod
    def select(state: StaticState, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (finished rows leave the batch); only filled slots are copied."""
        keep = keep.to(state.bias_BT.device)
        kv = state.kv
        out = _empty((kv.shape[0], 2, len(keep), *kv.shape[3:]), kv)
        for i in range(kv.shape[0]):
            out[i, :, :, :, : state.slot] = kv[i, :, :, :, : state.slot].index_select(1, keep)
        state.kv = out
        state.bias_BT = state.bias_BT.index_select(0, keep)

    @torch.inference_mode()
    def step(self, state: StaticState, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` after feeding ``tokens_B`` at ``positions_B``; the token's keys
        and values land in slot ``state.slot``, which then advances."""
        slot = state.slot
        if slot >= state.bias_BT.shape[1]:
            raise ValueError(f"static cache full: {slot} slots")
        state.bias_BT[:, slot] = 0.0
        state.slot = slot + 1
        x = F.embedding(tokens_B, self.embed)  # [B, C]
        batch, dtype = x.shape[0], x.dtype
        freqs = positions_B.to(self.inv_freq.device)[:, None].float() * self.inv_freq[None]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scale).to(dtype)[:, None]  # [B, 1, D]
        sin = (angles.sin() * self.rope_scale).to(dtype)[:, None]
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        filled = slot + 1
        mask = state.bias_BT[:, None, None, :filled]  # [B, 1, 1, filled]
        for layer, (K, V) in zip(self.layers, state.kv, strict=True):
            qkv = _linear(F.rms_norm(x, (x.shape[-1],), layer.ln1, self.eps), layer.qkv, layer.qkv_bias)
            qk = qkv[:, : (h + hk) * d].view(batch, h + hk, d)
            if layer.q_norm is not None and layer.k_norm is not None:
                qk = torch.cat([F.rms_norm(qk[:, :h], (d,), layer.q_norm, self.eps),
                                F.rms_norm(qk[:, h:], (d,), layer.k_norm, self.eps)], dim=1)  # fmt: skip
            qk = qk * cos + torch.cat((-qk[..., d // 2 :], qk[..., : d // 2]), dim=-1) * sin  # rotary, q and k at once
            K[:, :, slot] = qk[:, h:]
            V[:, :, slot] = qkv[:, (h + hk) * d :].view(batch, hk, d)
            attn = F.scaled_dot_product_attention(
                qk[:, :h].view(batch, hk, h // hk, d),  # a group's query heads as its queries
                K[:, :, :filled],  # [B, kv_heads, filled, d]
                V[:, :, :filled],
                attn_mask=mask,
                scale=1.0,  # in q's weights
            )
            x = x + _linear(attn.reshape(batch, h * d), layer.o, None)
            gate_up = _linear(F.rms_norm(x, (x.shape[-1],), layer.ln2, self.eps), layer.gate_up, None)
            x = x + _linear(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :], layer.down, None)
        return _linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.head, None)
