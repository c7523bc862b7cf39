"""How much GPU memory a ``mathrl train`` run needs per GPU, estimated from the model's config.

One line at start-up says whether a run fits before it loads 16 GB of weights and dies an
hour later in the first backward. Pure arithmetic on a ``transformers`` config: nothing is
loaded, nothing is imported but the standard library.

**Parameters** (dense Llama-style decoders: llama, mistral, qwen2, qwen3, smollm; exact for
these, a test compares with ``sum(p.numel())`` of models built from their configs). With
vocabulary V, hidden size h, MLP size i, L layers, n_q query and n_kv key/value heads of
size d (``head_dim``, default h / n_q)::

    embeddings V*h, + V*h for the LM head unless tied, + final norm h
    per layer: q h*n_q*d, k and v h*n_kv*d each, o n_q*d*h, MLP 3*h*i, 2 norms 2*h
               + Qwen3's q/k norms 2*d; + biases: q, k, v (qwen2, or attention_bias), o (attention_bias),
               MLP (mlp_bias)

    Qwen3-8B (V 151936, h 4096, i 12288, L 36, 32/8 heads, d 128, untied):
        2*151936*4096 + 36*(4096*4096*2 + 2*4096*1024 + 3*4096*12288 + 2*4096 + 2*128) + 4096
        = 1,244,659,712 + 36*192,946,432 + 4,096 = 8,190,735,360   (~8.19e9)
    Llama-3.1-8B (V 128256, h 4096, i 14336, L 32, 32/8 heads, d 128, untied):
        2*128256*4096 + 32*(4096*4096*2 + 2*4096*1024 + 3*4096*14336 + 2*4096) + 4096
        = 1,050,673,152 + 32*218,112,000 + 4,096 = 8,030,261,248   (8.03e9)

LoRA (``mathrl.models.wrap_lora``: every linear projection of every layer, not the LM head)
adds r*(in + out) per projection.

**Memory per GPU**, in GB of 1e9 bytes, as ``mathrl train`` holds it (``train_bf16``, the default):

- *weights*: LoRA: the frozen base in bf16, 2 bytes/param. Full fine-tuning: the fp32 weights
  (they are the master copy), 4 bytes/param, + the bf16 copies autocast makes in the forward and
  the backward keeps, 2 bytes/param.
- *trainable+optimizer*: per trainable parameter, fp32 gradient 4 + AdamW's two moments 8, and
  for LoRA the fp32 adapter itself 4 (for full fine-tuning it is already in *weights*).
- FSDP (``parallel=fsdp``) shards both of these over ``world_size``; DDP replicates them. Not
  counted: FSDP's all-gathered layer in flight (~2 layers of bf16 weights), DDP's gradient buckets.
- *activations* of one micro-batch of ``max(micro_batch_tokens, prompt_tokens + max_tokens)``
  tokens (a micro-batch holds at least one sequence), what autograd keeps for the backward:
  (20*h + 11*i) bytes per token per layer, + 4*(n_q + n_kv)*d for Qwen3's q/k norms (fitted to
  the saved tensors of HF Llama/Qwen3 blocks with LoRA under bf16 autocast and SDPA, measured with
  ``torch.autograd.graph.saved_tensors_hooks``: fp32 norm inputs, q/k/v/attention output, the
  gate/up/SiLU/product of the MLP), + 4*V per token for the fp32 log-softmax of the LM head that
  the loss's backward needs. With gradient checkpointing only each layer's input is kept
  (4*h bytes per token per layer, measured), plus one layer's full activations while it is
  recomputed. Attention is assumed fused (no [T, T] scores kept).
- *sampler*, ``sampler=local``: the in-process sampler's own bf16 copy of the model (LoRA merged
  in), 2 bytes/param, and for answers of 32+ tokens (the static-cache decoder,
  :mod:`mathrl.rollout.static_cache`) its packed copy, 2 more (an upper bound on a GPU, where only
  q/k/v and gate/up are copied, fused), + the KV cache of one decode chunk, ``min(group_size * groups_per_batch,
  sampler_max_batch)`` rows (TorchSampler's ``max_batch``, 256) of ``prompt_tokens + max_tokens``
  positions, 2 (k, v) * L * n_kv * d bf16 values each. ``sampler=remote``: 0 here; the server's
  memory is its own (vLLM takes ``--gpu-memory-utilization`` of its GPU).

Not counted: the CUDA context and allocator slack (~1-3 GB), a KL reference copy
(``kl_penalty_coef`` with full fine-tuning), the prompt KV cache the trainer fans out to its rows.
An estimate to decide what fits, not an accounting: treat it as +-20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GB = 1e9
LOCAL_SAMPLER_MAX_BATCH = 256  # TorchSampler's default max_batch: rows decoded at once
STATIC_MIN_TOKENS = 32  # mathrl.rollout.sampler's (not imported: no torch here); a test holds them equal


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory per GPU in GB (1e9 bytes); see the module docstring for the formulas."""

    params: int  # parameters of the model
    trainable_params: int  # LoRA adapters, or every parameter
    weights: float  # model weights held by the trainer
    trainable: float  # trainable parameters' fp32 master (LoRA), gradients and AdamW state
    activations: float  # one micro-batch's forward kept for the backward
    sampler: float  # the in-process sampler's weights and KV cache (0 with sampler=remote)
    total: float  # the sum: per GPU

    def describe(self) -> str:
        return (
            f"memory per GPU (estimate): weights {self.weights:.1f} GB, trainable+optimizer {self.trainable:.1f} GB, "
            f"activations {self.activations:.1f} GB, sampler {self.sampler:.1f} GB -> ~{self.total:.1f} GB"
        )


@dataclass(frozen=True)
class _Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def of(cls, config: PretrainedConfig | Any) -> _Shape:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        if any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise ValueError(f"mathrl.memory covers dense decoders; {config.model_type} is a mixture of experts")
        model_type = getattr(config, "model_type", "")
        q_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            q_heads=q_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or q_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // q_heads,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of each linear projection of one layer."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        n = sum(a * b for a, b in self.projections()) + 2 * h
        n += 2 * self.head_dim if self.qk_norm else 0
        n += (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        n += h if self.o_bias else 0
        n += (2 * i + h) if self.mlp_bias else 0
        return n

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.projections())

    def layer_activation_bytes(self) -> int:
        """Bytes autograd keeps per token for one layer's backward (fitted; module docstring)."""
        extra = 4 * (self.q_dim + self.kv_dim) if self.qk_norm else 0
        return 20 * self.hidden + 11 * self.intermediate + extra


def param_count(config: PretrainedConfig | Any) -> int:
    """Parameters of the model ``config`` describes (dense Llama-style decoders)."""
    return _Shape.of(config).params()


def lora_param_count(config: PretrainedConfig | Any, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA adapters on every linear projection (not the LM head)."""
    return _Shape.of(config).lora_params(rank)


def estimate(
    config: PretrainedConfig | Any,
    *,
    lora_rank: int,
    group_size: int,
    groups_per_batch: int,
    max_tokens: int,
    prompt_tokens: int,
    micro_batch_tokens: int,
    world_size: int = 1,
    parallel: str = "ddp",
    gradient_checkpointing: bool = False,
    sampler: str = "local",
    sampler_max_batch: int = LOCAL_SAMPLER_MAX_BATCH,
) -> MemoryEstimate:
    """Memory per GPU of a GRPO run of the model ``config`` describes (formulas: module docstring)."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel: expected ddp or fsdp, got {parallel!r}")
    if sampler not in ("local", "remote"):
        raise ValueError(f"sampler: expected local or remote, got {sampler!r}")
    minimums = {
        "lora_rank": (lora_rank, 0),
        "prompt_tokens": (prompt_tokens, 0),
        "group_size": (group_size, 1),
        "groups_per_batch": (groups_per_batch, 1),
        "max_tokens": (max_tokens, 1),
        "micro_batch_tokens": (micro_batch_tokens, 1),
        "world_size": (world_size, 1),
        "sampler_max_batch": (sampler_max_batch, 1),
    }
    for name, (value, least) in minimums.items():
        if value < least:
            raise ValueError(f"{name}: expected >= {least}, got {value}")
    shape = _Shape.of(config)
    params = shape.params()
    shards = world_size if parallel == "fsdp" else 1
    if lora_rank:
        trainable_params = shape.lora_params(lora_rank)
        weights = params * 2  # frozen bf16 base
        trainable = trainable_params * (4 + 4 + 8)  # fp32 adapter, gradient, AdamW moments
    else:
        trainable_params = params
        weights = params * (4 + 2)  # fp32 master weights + autocast's bf16 copies
        trainable = params * (4 + 8)  # gradient, AdamW moments
    tokens = max(micro_batch_tokens, prompt_tokens + max_tokens)
    per_layer = shape.layer_activation_bytes()
    if gradient_checkpointing:
        activations = tokens * (shape.layers * 4 * shape.hidden + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    activations += tokens * shape.vocab * 4  # fp32 log-softmax of the LM head
    sampler_bytes = 0
    if sampler == "local":
        rows = min(group_size * groups_per_batch, sampler_max_batch)
        kv_cache = rows * (prompt_tokens + max_tokens) * shape.layers * 2 * shape.kv_dim * 2
        packed = params * 2 if max_tokens >= STATIC_MIN_TOKENS else 0  # the static decoder's weights
        sampler_bytes = params * 2 + packed + kv_cache
    parts = (weights / shards / GB, trainable / shards / GB, activations / GB, sampler_bytes / GB)
    return MemoryEstimate(params, trainable_params, *parts, total=sum(parts))
