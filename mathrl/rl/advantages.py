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
