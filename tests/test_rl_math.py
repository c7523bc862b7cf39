"""Advantages, losses and aggregation against values computed by hand."""

import math

import pytest
import torch

from mathrl.rl.advantages import group_advantages, is_constant
from mathrl.rl.losses import AGGREGATIONS, LOSSES, importance_sampling_loss, kl_k3, ppo_loss


def test_advantages_center_on_group_mean():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    # mean 0.6
    assert torch.allclose(adv, torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))


def test_advantages_divided_by_population_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), normalize_std=True)
    # mean 0.5, population std 0.5
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)


def test_constant_group_has_zero_advantage_and_is_flagged():
    rewards = torch.tensor([1.0, 1.0, 1.0])
    assert is_constant(rewards)
    assert not is_constant(torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(group_advantages(rewards, normalize_std=True), torch.zeros(3))


def _lp(p: float) -> torch.Tensor:
    return torch.tensor([[math.log(p)]])


_ONE = torch.ones(1, 1)  # the action mask of a one-token sequence


def test_importance_sampling_loss_value():
    # ratio = 0.5 / 0.25 = 2, A = 1.5 -> -3
    loss = importance_sampling_loss(_lp(0.5), _lp(0.25), torch.tensor([1.5]), _ONE, 0.2, 0.2)
    assert loss.item() == pytest.approx(-3.0)


def test_importance_sampling_gradient_on_policy_is_reinforce():
    logp = torch.tensor([[math.log(0.3), math.log(0.6)]], requires_grad=True)
    loss = importance_sampling_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2).sum()
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0]]))


@pytest.mark.parametrize(
    ("p", "q", "adv", "expected"),
    [
        (0.5, 0.25, 1.5, -1.8),  # ratio 2 clipped to 1.2: -min(3.0, 1.8)
        (0.5, 0.25, -1.0, 2.0),  # negative advantage: -min(-2.0, -1.2) keeps the unclipped term
        (0.25, 0.5, 1.0, -0.5),  # ratio 0.5: -min(0.5, 0.8)
        (0.25, 0.5, -1.0, 0.8),  # ratio 0.5 clipped to 0.8: -min(-0.5, -0.8)
        (0.3, 0.3, 1.0, -1.0),  # on-policy: ratio 1
    ],
)
def test_ppo_loss_values(p, q, adv, expected):
    assert ppo_loss(_lp(p), _lp(q), torch.tensor([adv]), _ONE, 0.2, 0.2).item() == pytest.approx(expected)


def test_ppo_clipped_token_has_no_gradient():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ppo_loss(logp, _lp(0.25), torch.tensor([1.5]), _ONE, 0.2, 0.2).sum().backward()
    assert logp.grad.item() == 0.0


def test_aggregation_weights():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(AGGREGATIONS["token_sum"](mask, 4), torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.0]]))
    assert torch.allclose(AGGREGATIONS["token_mean"](mask, 4), mask / 3)
    assert torch.allclose(AGGREGATIONS["seq_mean"](mask, 4), torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]))
    # Dr. GRPO: 1 / (2 sequences x max_tokens 4) = 0.125 for every action token, whatever its length
    assert torch.allclose(AGGREGATIONS["token_sum_norm"](mask, 4), mask * 0.125)


def test_kl_k3_value_and_zero_at_equality():
    # log(ref/pi) = log(0.25/0.5); k3 = 0.5 - log(0.5) - 1
    assert kl_k3(_lp(0.5), _lp(0.25)).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(_lp(0.4), _lp(0.4)).item() == pytest.approx(0.0)


def test_registries_name_the_documented_variants():
    assert set(LOSSES) == {"importance_sampling", "ppo", "cispo", "gspo"}
    assert set(AGGREGATIONS) == {"token_sum", "token_sum_norm", "token_mean", "seq_mean"}
