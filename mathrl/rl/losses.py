"""Per-token policy-gradient losses and how they are aggregated, each behind a registry.

A loss maps (logp_BT, sample_logp_BT, advantages_B) to a per-token loss [B, T];
an aggregation maps the action mask [B, T] to per-token weights whose weighted sum is
the batch loss. Weights are computed once over the whole (mini)batch, so splitting it
into micro-batches for memory changes nothing. Non-action positions must be masked by
the caller (their weight is 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def importance_sampling_loss(
    logp_BT: torch.Tensor, sample_logp_BT: torch.Tensor, advantages_B: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """-ratio * A with ratio = pi_theta / pi_sample (tinker's default). On-policy, ratio == 1
    and the gradient is the REINFORCE gradient; off-policy steps are corrected by the ratio."""
    ratio_BT = torch.exp(logp_BT - sample_logp_BT)
    return -ratio_BT * advantages_B[:, None]


def ppo_loss(
    logp_BT: torch.Tensor, sample_logp_BT: torch.Tensor, advantages_B: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """PPO's clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)."""
    ratio_BT = torch.exp(logp_BT - sample_logp_BT)
    adv_B1 = advantages_B[:, None]
    return -torch.minimum(ratio_BT * adv_B1, ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_B1)


LOSSES: dict[str, LossFn] = {"importance_sampling": importance_sampling_loss, "ppo": ppo_loss}


def token_sum_weights(mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum over tokens, mean over sequences: long answers weigh more (Dr. GRPO's constant normalizer)."""
    return mask_BT / mask_BT.shape[0]


def token_mean_weights(mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over every action token of the batch (DAPO)."""
    return mask_BT / mask_BT.sum().clamp(min=1)


def seq_mean_weights(mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over tokens within a sequence, then over sequences (the GRPO paper)."""
    per_seq_B1 = mask_BT.sum(dim=1, keepdim=True).clamp(min=1)
    return mask_BT / per_seq_B1 / mask_BT.shape[0]


AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "token_sum": token_sum_weights,
    "token_mean": token_mean_weights,
    "seq_mean": seq_mean_weights,
}


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: non-negative, unbiased."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1
