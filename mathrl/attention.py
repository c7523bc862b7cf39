"""Eager attention for grouped-query models without copying the keys and values.

transformers' eager attention repeats every key/value head for each query head that shares
it (``repeat_kv``: SmolLM2-135M has 9 query heads over 3 key/value heads) before two
matmuls. At decode that copies the whole KV cache of every layer at every step: memory
traffic that grows with the context and, on the CPU, costs more than the step's matmuls.
Here the query heads of a group are stacked instead, ``[B, KV, G * Q, D]``, and multiply the
shared key/value heads directly: the same result (tested against the eager function), no
copy. Registered with transformers' ``AttentionInterface`` (and its mask interface, as
eager) under the name ``"mathrl_gqa"``; ``mathrl.models.load_model`` uses it on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "mathrl_gqa"


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Q, D], key/value [B, KV, L, D], additive mask [B, 1, Q, L] ->
    (output [B, Q, H, D], weights [B, H, Q, L]), as transformers' eager attention."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    g = h // kv
    query_BKgD = query.reshape(b, kv, g * q, d)  # head i*g + j uses key/value head i
    scores = torch.matmul(query_BKgD, key.transpose(2, 3)) * scaling  # [B, KV, G*Q, L]
    if attention_mask is not None:
        scores = (scores.view(b, kv, g, q, -1) + attention_mask[:, :, None, :, : key.shape[2]]).view_as(scores)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # [B, KV, G*Q, D]
    return out.view(b, h, q, d).transpose(1, 2).contiguous(), weights.view(b, h, q, -1)


def register() -> str:
    """Make ``attn_implementation="mathrl_gqa"`` available; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME
