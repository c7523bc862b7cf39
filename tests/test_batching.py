"""Trajectories -> training sequences, and the trainer's logprobs of action tokens."""

import torch

from mathrl.rl.batching import action_logprobs, collate, trajectory_datums
from mathrl.types import Completion, Trajectory, Transition


def _tr(ob, ac, lps=None):
    lps = lps or [-0.5] * len(ac)
    return Transition(tuple(ob), Completion(tuple(ac), tuple(lps), "stop"), "", 0.0, False)


def test_single_turn_datum_marks_only_action_tokens():
    (d,) = trajectory_datums(Trajectory((_tr([5, 6, 7], [8, 9], [-1.0, -2.0]),)), advantage=0.5)
    assert d.tokens_T == (5, 6, 7, 8, 9)
    assert d.action_mask_T == (False, False, False, True, True)
    assert d.sample_logprobs_T == (0.0, 0.0, 0.0, -1.0, -2.0)
    assert d.advantage == 0.5


def test_multi_turn_merges_when_the_prompt_extends_and_splits_when_not():
    extending = Trajectory((_tr([5, 6], [7]), _tr([5, 6, 7, 20, 21], [8, 9])))
    (d,) = trajectory_datums(extending, 1.0)
    assert d.tokens_T == (5, 6, 7, 20, 21, 8, 9)
    assert d.action_mask_T == (False, False, True, False, False, True, True)
    broken = Trajectory((_tr([5, 6], [7]), _tr([5, 99, 7], [8])))
    d1, d2 = trajectory_datums(broken, 1.0)
    assert d1.tokens_T == (5, 6, 7)
    assert d2.tokens_T == (5, 99, 7, 8)


def test_action_logprobs_match_full_logits(tiny_model):
    datums = trajectory_datums(Trajectory((_tr([5, 6, 7], [8, 9, 1]),)), 1.0)
    datums += trajectory_datums(Trajectory((_tr([10, 11], [12]),)), -1.0)
    batch = collate(datums, pad_token_id=0)
    assert batch.input_ids_BT.shape == (2, 6)
    with torch.no_grad():
        logp_BT, ent_BT = action_logprobs(tiny_model, batch, temperature=1.0)
        full = torch.log_softmax(tiny_model(batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits, -1)
    for b, d in enumerate(datums):
        for t, is_action in enumerate(d.action_mask_T):
            if is_action:
                assert torch.isclose(logp_BT[b, t], full[b, t - 1, d.tokens_T[t]], atol=1e-5)
                p = full[b, t - 1].exp()
                assert torch.isclose(ent_BT[b, t], -(p * full[b, t - 1]).sum(), atol=1e-4)
            else:
                assert logp_BT[b, t] == 0
