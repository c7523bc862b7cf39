"""Group-relative advantages (GRPO)."""

from __future__ import annotations

import torch


def group_advantages(rewards_G: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """advantage = reward - group mean, optionally divided by the group's std.

    GRPO divides by the std; Dr. GRPO (Liu et al. 2025) argues that this over-weights
    groups that are nearly all right or all wrong, so it is off by default (as in
    tinker-cookbook). The std is the population std (ddof=0); a constant group gets 0.
    """
    centered_G = rewards_G - rewards_G.mean()
    if normalize_std:
        centered_G = centered_G / (rewards_G.std(unbiased=False) + eps)
    return centered_G


def is_constant(rewards_G: torch.Tensor) -> bool:
    """A group whose members all got the same reward carries no learning signal."""
    return bool((rewards_G == rewards_G[0]).all())


def overlong_penalty(num_tokens: int, max_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``max_tokens - buffer``
    tokens, then linear down to ``-penalty`` at ``max_tokens`` (the longest a completion can
    be here, so DAPO's flat -1 beyond it never applies). ``buffer=0`` is off."""
    if buffer <= 0:
        return 0.0
    over = num_tokens - (max_tokens - buffer)
    return -penalty * min(max(over, 0), buffer) / buffer
