"""The issue-15 losses and DAPO options against values computed by hand (in the comments),
and the default losses against the formulas they had before the registry changed."""

import math

import pytest
import torch

from mathrl.rl.advantages import overlong_penalty
from mathrl.rl.losses import AGGREGATIONS, LOSSES, cispo_loss, gspo_loss, ppo_loss
from mathrl.train.rl import TrainConfig, _datums, _rewards, clip_range, dynamic_sample
from mathrl.types import Completion, Trajectory, TrajectoryGroup, Transition

LN2 = math.log(2)


def _lp(*ps: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in ps]])


ONE = torch.ones(1, 1)


# --- the default path: unchanged -------------------------------------------------------------


def _old_importance_sampling(logp, sample_logp, adv, eps):  # the formulas before issue 15, verbatim
    return -torch.exp(logp - sample_logp) * adv[:, None]


def _old_ppo(logp, sample_logp, adv, eps):
    ratio = torch.exp(logp - sample_logp)
    return -torch.minimum(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])


@pytest.mark.parametrize(("name", "old"), [("importance_sampling", _old_importance_sampling), ("ppo", _old_ppo)])
def test_default_losses_are_bit_identical_to_the_old_formulas(name, old):
    """The main job (importance_sampling, token_mean, ppo_clip both sides) must not move by a bit."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(5, 7, generator=g) * 3).requires_grad_()
    sample_logp = -torch.rand(5, 7, generator=g) * 3
    adv = torch.randn(5, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    new = LOSSES[name](logp, sample_logp, adv, mask, *clip_range(TrainConfig(loss_fn=name)))
    (grad_new,) = torch.autograd.grad((new * mask).sum(), logp)
    ref = old(logp, sample_logp, adv, 0.2)
    (grad_ref,) = torch.autograd.grad((ref * mask).sum(), logp)
    assert torch.equal(new, ref) and torch.equal(grad_new, grad_ref)
    # token_mean's weights: mask / number of action tokens, as before
    assert torch.equal(AGGREGATIONS["token_mean"](mask, 16), mask / mask.sum().clamp(min=1))


# --- clip ranges ----------------------------------------------------------------------------


def test_clip_range_defaults_and_asymmetric_keys():
    assert clip_range(TrainConfig()) == (0.2, 0.2)  # ppo_clip on both sides
    assert clip_range(TrainConfig(ppo_clip=0.1)) == (0.1, 0.1)
    assert clip_range(TrainConfig(ppo_clip_high=0.28)) == (0.2, 0.28)  # DAPO clip-higher
    assert clip_range(TrainConfig(ppo_clip_low=0.1, ppo_clip_high=0.3)) == (0.1, 0.3)
    assert clip_range(TrainConfig(loss_fn="cispo")) == (1.0, 0.2)  # no lower bound: 1 - 1 = 0
    assert clip_range(TrainConfig(loss_fn="cispo", ppo_clip_low=0.5)) == (0.5, 0.2)


@pytest.mark.parametrize(
    ("p", "q", "adv", "low", "high", "expected"),
    [
        (0.5, 0.25, 1.0, 0.2, 0.28, -1.28),  # ratio 2 clipped to 1.28 (clip-higher): -min(2, 1.28)
        (0.5, 0.25, 1.0, 0.2, 0.2, -1.2),  # symmetric: clipped to 1.2
        (0.25, 0.5, -1.0, 0.2, 0.28, 0.8),  # ratio 0.5 clipped up to 0.8: -min(-0.5, -0.8)
        (0.25, 0.5, -1.0, 0.4, 0.28, 0.6),  # a wider lower side: 1 - 0.4 = 0.6: -min(-0.5, -0.6)
    ],
)
def test_ppo_asymmetric_clip_values(p, q, adv, low, high, expected):
    assert ppo_loss(_lp(p), _lp(q), torch.tensor([adv]), ONE, low, high).item() == pytest.approx(expected)


# --- CISPO ----------------------------------------------------------------------------------


def test_cispo_value_and_gradient_of_a_clipped_token():
    # ratio 0.5 / 0.25 = 2 -> weight clipped to 1 + 0.2 = 1.2, detached; A = 1.5
    # loss = -1.2 * 1.5 * log(0.5) = 1.8 * ln 2; d loss / d logp = -1.2 * 1.5 = -1.8 (PPO: 0)
    logp = _lp(0.5).requires_grad_()
    loss = cispo_loss(logp, _lp(0.25), torch.tensor([1.5]), ONE, 1.0, 0.2)
    assert loss.item() == pytest.approx(1.8 * LN2)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-1.8)


def test_cispo_lower_bound_only_when_asked():
    # ratio 0.25 / 0.5 = 0.5, A = -1. No lower bound (clip_low 1): weight 0.5, grad = -0.5 * -1 = 0.5
    # loss = -0.5 * -1 * log(0.25) = -2 ln 2 * 0.5 = -ln 2
    logp = _lp(0.25).requires_grad_()
    loss = cispo_loss(logp, _lp(0.5), torch.tensor([-1.0]), ONE, 1.0, 0.2)
    assert loss.item() == pytest.approx(-LN2)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(0.5)
    # clip_low 0.2: weight raised to 0.8, grad 0.8
    logp = _lp(0.25).requires_grad_()
    cispo_loss(logp, _lp(0.5), torch.tensor([-1.0]), ONE, 0.2, 0.2).sum().backward()
    assert logp.grad.item() == pytest.approx(0.8)


# --- GSPO -----------------------------------------------------------------------------------


def test_gspo_ratio_is_per_sequence_and_clipped_per_sequence():
    # sequence 0: token log-ratios ln2, ln2 (a masked third token with ln8 is ignored): s = 2,
    #   A = 1: clipped to 1.2 -> loss -1.2 at each token, no gradient.
    # sequence 1: log-ratios ln2, -ln2: s = exp(0) = 1, A = -1: loss 1 per token, gradient
    #   -A * s = 1 per token (token-level PPO would give token 0: -min(-2, -1.2) = 2).
    logp = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.8)], [math.log(0.5), math.log(0.25), 0.0]])
    sample = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.1)], [math.log(0.25), math.log(0.5), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    logp.requires_grad_()
    loss = gspo_loss(logp, sample, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)
    assert torch.allclose(loss * mask, torch.tensor([[-1.2, -1.2, 0.0], [1.0, 1.0, 0.0]]))
    (loss * mask).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_gspo_with_seq_mean_has_the_papers_gradient():
    """Token-wise GSPO summed with seq_mean weights = the paper's sequence objective
    -mean_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(logp - logp_sample)): same value and gradient."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    logp = (-torch.rand(4, 4, generator=g) * 2) * mask
    sample = logp + torch.randn(4, 4, generator=g) * 0.3 * mask  # some sequences clipped, some not
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    x = logp.clone().requires_grad_()
    ours = (gspo_loss(x, sample, adv, mask, 0.2, 0.2) * AGGREGATIONS["seq_mean"](mask, 4)).sum()
    (grad_ours,) = torch.autograd.grad(ours, x)
    y = logp.clone().requires_grad_()
    s = torch.exp(((y - sample) * mask).sum(1) / mask.sum(1))
    paper = -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv).mean()
    (grad_paper,) = torch.autograd.grad(paper, y)
    assert ours.item() == pytest.approx(paper.item(), abs=1e-6)
    assert torch.allclose(grad_ours * mask, grad_paper, atol=1e-6)
    assert (grad_paper != 0).any() and (grad_paper.abs().sum(1) == 0).any()  # both cases occur


# --- DAPO's options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "buffer", "penalty", "expected"),
    [
        (5, 4, 1.0, 0.0),  # far from max_tokens 16
        (12, 4, 1.0, 0.0),  # max_tokens - buffer: the ramp starts here
        (13, 4, 1.0, -0.25),  # 1 of 4 buffer tokens used
        (14, 4, 0.5, -0.25),  # 2 of 4, penalty 0.5
        (16, 4, 1.0, -1.0),  # at max_tokens: the whole penalty
        (16, 0, 1.0, 0.0),  # buffer 0: off
    ],
)
def test_overlong_penalty_values(n, buffer, penalty, expected):
    assert overlong_penalty(n, 16, buffer, penalty) == pytest.approx(expected)


def _traj(reward: float, n_tokens: int, truncated: bool = False) -> Trajectory:
    ac = Completion(tuple(range(10, 10 + n_tokens)), (-0.5,) * n_tokens, "length" if truncated else "stop")
    return Trajectory((Transition((1, 2, 3), ac, "", reward, True),))


def _group(*trajs: Trajectory) -> TrajectoryGroup:
    return TrajectoryGroup(tuple(trajs))


# rewards 1, 0, 0, 1; lengths 3, 16 (cut off), 5, 14; max_tokens 16
GROUP = _group(_traj(1.0, 3), _traj(0.0, 16, truncated=True), _traj(0.0, 5), _traj(1.0, 14))


def test_overlong_shaping_enters_the_advantages():
    cfg = TrainConfig(max_tokens=16, overlong_buffer=4, overlong_penalty=1.0)
    # penalties 0, -1 (16 tokens), 0, -0.5 (14 = 12 + 2 of 4): rewards 1, -1, 0, 0.5, mean 0.125
    assert _rewards(GROUP, cfg).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.5])
    assert [d.advantage for d in _datums([GROUP], cfg)] == pytest.approx([0.875, -1.125, -0.125, 0.375])
    # off by default: advantages are reward - mean 0.5
    assert [d.advantage for d in _datums([GROUP], TrainConfig(max_tokens=16))] == [0.5, -0.5, -0.5, 0.5]


def test_overlong_filter_drops_truncated_answers_from_the_loss_only():
    cfg = TrainConfig(max_tokens=16, overlong_filter=True)
    datums = _datums([GROUP], cfg)
    # the truncated answer still counts in the group mean (0.5), but carries no loss
    assert [d.advantage for d in datums] == [0.5, -0.5, 0.5]
    assert [sum(d.action_mask_T) for d in datums] == [3, 5, 14]


def test_a_group_with_spread_only_from_the_penalty_is_trained_on():
    both_wrong = _group(_traj(0.0, 3), _traj(0.0, 16, truncated=True))
    assert _datums([both_wrong], TrainConfig(max_tokens=16)) == []  # constant: dropped
    shaped = _datums([both_wrong], TrainConfig(max_tokens=16, overlong_buffer=4))
    assert [d.advantage for d in shaped] == [0.5, -0.5]  # rewards 0, -1: the shorter one is preferred


def _spread(k: int) -> TrajectoryGroup:
    return _group(_traj(float(k % 2), 2), _traj(1.0, 2))  # odd k: constant; even k: spread


def test_dynamic_sampling_draws_until_enough_groups_have_spread():
    batches = {0: [_spread(1), _spread(0), _spread(1)], 1: [_spread(0), _spread(3)], 2: [_spread(2), _spread(4)]}
    calls = []

    def draw(k):
        calls.append(k)
        return list(batches[k])

    def keep(g):
        return len(set(g.rewards_G)) > 1

    drawn, kept, extra = dynamic_sample(draw, keep, target=3, max_extra=5)
    # draw 0: 1 with spread; draw 1: 2 in all; draw 2: 4 >= 3 -> stop, keep the first 3
    assert calls == [0, 1, 2] and extra == 2 and len(drawn) == 7
    assert kept == [batches[0][1], batches[1][0], batches[2][0]]
    # the cap: at most 1 extra draw, then train with what there is
    calls.clear()
    drawn, kept, extra = dynamic_sample(draw, keep, target=3, max_extra=1)
    assert calls == [0, 1] and extra == 1 and len(kept) == 2
    # enough on the first draw: no extra draw, still at most target groups
    calls.clear()
    assert dynamic_sample(draw, keep, target=1, max_extra=5)[1:] == ([batches[0][1]], 0)
    assert calls == [0]


def test_unknown_loss_is_a_one_line_error_listing_the_registry():
    from mathrl.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, ["loss_fn=grpo"])
    message = str(e.value)
    assert "\n" not in message and all(name in message for name in LOSSES)
    with pytest.raises(ConfigError, match="token_sum_norm"):
        parse_config(TrainConfig, ["loss_agg=sum"])
    assert parse_config(TrainConfig, ["loss_fn=gspo", "loss_agg=token_sum_norm"]).loss_agg == "token_sum_norm"
