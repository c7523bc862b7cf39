"""Per-token policy-gradient losses and how they are aggregated, each behind a registry.

A loss maps (logp_BT, sample_logp_BT, advantages_B, mask_BT, clip_low, clip_high) to a
per-token loss [B, T]; an aggregation maps the action mask [B, T] (and ``max_tokens``) to
per-token weights whose weighted sum is the batch loss. Weights are computed once over the
whole (mini)batch, so splitting it into micro-batches for memory changes nothing.
Non-action positions must be masked by the caller (their weight is 0).

Adding a loss is one function and one entry in :data:`LOSSES` (likewise :data:`AGGREGATIONS`):
the command line's choices are these registries' keys. That is why this module does not
import torch at run time (only tensor methods are used): ``mathrl train --help`` reads the
keys without paying for torch (tests/test_cli.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

LossFn = Callable[["Tensor", "Tensor", "Tensor", "Tensor", float, float], "Tensor"]
AggregationFn = Callable[["Tensor", int], "Tensor"]


def importance_sampling_loss(
    logp_BT: Tensor, sample_logp_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """-ratio * A with ratio = pi_theta / pi_sample (tinker's default). On-policy, ratio == 1
    and the gradient is the REINFORCE gradient; off-policy steps are corrected by the ratio."""
    ratio_BT = (logp_BT - sample_logp_BT).exp()
    return -ratio_BT * advantages_B[:, None]


def ppo_loss(
    logp_BT: Tensor, sample_logp_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """PPO's clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).
    eps_low == eps_high is PPO; a larger eps_high is DAPO's clip-higher."""
    ratio_BT = (logp_BT - sample_logp_BT).exp()
    adv_B1 = advantages_B[:, None]
    return -(ratio_BT * adv_B1).minimum(ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_B1)


def cispo_loss(
    logp_BT: Tensor, sample_logp_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """CISPO (MiniMax-M1): -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * logp.

    The importance weight is clipped and detached, so every token keeps a gradient
    (weight * A * grad logp), unlike PPO which zeroes the gradient of clipped tokens.
    MiniMax-M1 sets no lower bound: ``clip_low=1`` (the trainer's default for cispo) makes
    the lower bound 0, which a ratio never crosses.
    """
    weight_BT = (logp_BT - sample_logp_BT).exp().clamp(1 - clip_low, 1 + clip_high).detach()
    return -weight_BT * advantages_B[:, None] * logp_BT


def gspo_loss(
    logp_BT: Tensor, sample_logp_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """GSPO (Zheng et al. 2025, Qwen): PPO's clipped surrogate on the sequence-level ratio
    s = exp(mean over the sequence's action tokens of (logp - logp_sample)).

    Written token-wise as the paper's GSPO-token: s_t = sg(s) * pi_t / sg(pi_t), whose value is
    s at every token and whose gradient is s * grad logp_t; clipping is by sequence (every
    token of a sequence has the same s). With ``loss_agg=seq_mean`` the batch loss is the
    paper's objective and its gradient the paper's: mean_i s_i A_i mean_t grad logp_{i,t}
    (unclipped sequences). The paper's clip range is tiny (3e-4, 4e-4): s is a geometric
    mean, much closer to 1 than a token ratio.
    """
    n_B = mask_BT.sum(dim=1).clamp(min=1)
    seq_ratio_B = (((logp_BT - sample_logp_BT) * mask_BT).sum(dim=1) / n_B).exp()
    ratio_BT = seq_ratio_B.detach()[:, None] * (logp_BT - logp_BT.detach()).exp()
    adv_B1 = advantages_B[:, None]
    return -(ratio_BT * adv_B1).minimum(ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_B1)


LOSSES: dict[str, LossFn] = {
    "importance_sampling": importance_sampling_loss,
    "ppo": ppo_loss,
    "cispo": cispo_loss,
    "gspo": gspo_loss,
}


def token_sum_weights(mask_BT: Tensor, max_tokens: int) -> Tensor:
    """Sum over tokens, mean over sequences: long answers weigh more."""
    return mask_BT / mask_BT.shape[0]


def token_sum_norm_weights(mask_BT: Tensor, max_tokens: int) -> Tensor:
    """Dr. GRPO's constant normaliser: the token sum divided by ``max_tokens`` (not by each
    answer's length), mean over sequences: no length bias, and the scale does not depend on
    how long this batch's answers happen to be."""
    return mask_BT / (mask_BT.shape[0] * max_tokens)


def token_mean_weights(mask_BT: Tensor, max_tokens: int) -> Tensor:
    """Mean over every action token of the batch (DAPO)."""
    return mask_BT / mask_BT.sum().clamp(min=1)


def seq_mean_weights(mask_BT: Tensor, max_tokens: int) -> Tensor:
    """Mean over tokens within a sequence, then over sequences (the GRPO paper)."""
    per_seq_B1 = mask_BT.sum(dim=1, keepdim=True).clamp(min=1)
    return mask_BT / per_seq_B1 / mask_BT.shape[0]


AGGREGATIONS: dict[str, AggregationFn] = {
    "token_sum": token_sum_weights,
    "token_sum_norm": token_sum_norm_weights,
    "token_mean": token_mean_weights,
    "seq_mean": seq_mean_weights,
}


def kl_k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: non-negative, unbiased."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return log_ratio_BT.exp() - log_ratio_BT - 1
