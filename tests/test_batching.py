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


def _alone(model, d):
    """Plain forward of one datum: {position: (logp, entropy)} of its action tokens."""
    logp_TV = torch.log_softmax(model(torch.tensor([d.tokens_T])).logits[0].float(), -1)
    return {
        t: (logp_TV[t - 1, d.tokens_T[t]], -(logp_TV[t - 1].exp() * logp_TV[t - 1]).sum())
        for t, a in enumerate(d.action_mask_T)
        if a and t > 0
    }


def _batch_values(batch, logp_BT, ent_BT, datums):
    """The same {position: (logp, entropy)} read back from the shared-prefix layout."""
    out = []
    for b, d in enumerate(datums):
        cut = d.action_mask_T.index(True) - 1
        values = {}
        for t in range(batch.input_ids_BT.shape[1]):
            if batch.action_mask_BT[b, t] > 0:
                assert batch.input_ids_BT[b, t] == d.tokens_T[cut + t]
                values[cut + t] = (logp_BT[b, t], ent_BT[b, t])
            else:
                assert logp_BT[b, t] == 0
        out.append(values)
    return out


def _datums():
    """Two groups sharing prompts (as GRPO samples them), a different prompt length, a multi-turn episode."""
    datums = []
    for ac in ([8, 9, 1], [8, 4], [3, 9, 9, 2]):
        datums += trajectory_datums(Trajectory((_tr([5, 6, 7], ac),)), 1.0)
    for ac in ([12], [13, 14]):
        datums += trajectory_datums(Trajectory((_tr([10, 11], ac),)), -1.0)
    datums += trajectory_datums(Trajectory((_tr([5, 6], [7, 2]), _tr([5, 6, 7, 2, 20, 21], [8, 9]))), 0.5)
    return datums


def test_collate_shares_each_prompt_once():
    batch = collate(_datums(), pad_token_id=0)
    # prompts [5, 6, 7] (3 samples), [10, 11] (2), [5, 6] (1): prefixes are the prompt minus its last token
    assert batch.prefix_ids_PL.tolist() == [[5, 6], [0, 10], [0, 5]]
    assert batch.prefix_mask_PL.tolist() == [[1, 1], [0, 1], [0, 1]]
    assert batch.prefix_index_B.tolist() == [0, 0, 0, 1, 1, 2]
    assert batch.input_ids_BT[0].tolist()[:4] == [7, 8, 9, 1]
    part = batch.slice(3, 6)  # only the prefixes these rows use, padding trimmed to what they need
    assert part.prefix_ids_PL.tolist() == [[10], [5]] and part.prefix_index_B.tolist() == [0, 0, 1]
    assert part.input_ids_BT.shape[1] == max(int(m.sum()) for m in batch.attention_mask_BT[3:6])


def test_micro_batches_bound_tokens_and_count_each_prefix_once():
    batch = collate(_datums(), pad_token_id=0)
    lengths = batch.attention_mask_BT.sum(-1).tolist()  # suffixes 4, 3, 5, 2, 3, 7; prefixes 2, 1, 1
    assert lengths == [4, 3, 5, 2, 3, 7]
    assert batch.micro_batches(10_000) == [(0, 6)]
    # rows use prefixes 0, 0, 0, 1, 1, 2 (of 2, 1, 1 tokens); suffixes are padded to the longest:
    # prefix 2 + 2 rows x 4 = 10 fits 10, a third row (5) would make 2 + 3 x 5; then 2 + 5 = 7, and
    # + prefix 1 + 2 x 5 = 13 would not; 1 + 2 x 3 = 7, + prefix 1 + 3 x 7 would not; 1 + 7
    assert batch.micro_batches(10) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert batch.micro_batches(14) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # prefixes 2 + 1, 2 rows x 5 = 13
    assert batch.micro_batches(1) == [(b, b + 1) for b in range(6)]  # never empty


def test_action_logprobs_match_each_sequence_alone(tiny_model):
    """Shared prefixes, padding and multi-turn change nothing: every action token's logprob and
    entropy equal a plain forward of its sequence alone."""
    datums = _datums()
    batch = collate(datums, pad_token_id=0)
    with torch.no_grad():
        logp_BT, ent_BT = action_logprobs(tiny_model, batch, temperature=1.0)
    for d, got in zip(datums, _batch_values(batch, logp_BT, ent_BT, datums), strict=True):
        want = _alone(tiny_model, d)
        assert got.keys() == want.keys()
        for t in want:
            assert torch.isclose(got[t][0], want[t][0], atol=1e-5), (t, got[t][0], want[t][0])
            assert torch.isclose(got[t][1], want[t][1], atol=1e-4)


def test_gradient_through_shared_prefix_equals_unshared(tiny_model):
    """The prefix's backward runs once, with the gradients of all its copies summed: the same
    gradient as a plain forward over each whole sequence."""
    datums = _datums()
    batch = collate(datums, pad_token_id=0)
    tiny_model.zero_grad()
    logp_BT, _ = action_logprobs(tiny_model, batch, entropy=False)
    (logp_BT * batch.advantages_B[:, None]).sum().backward()
    shared = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    total = sum(sum(v[0] for v in _alone(tiny_model, d).values()) * d.advantage for d in datums)
    total.backward()
    for n, p in tiny_model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(shared[n], p.grad, atol=1e-5, rtol=1e-4), n
    tiny_model.zero_grad(set_to_none=True)


def test_no_deprecated_cache_argument_warning(tiny_model):
    # transformers >= 5.2x renamed past_key_values to cache and warned on every call: the main
    # job printed the FutureWarning 7 times. The trainer's forward and the sampler pass the new name.
    import warnings

    from mathrl.rl.batching import Datum
    from mathrl.rollout.sampler import TorchSampler

    datums = [Datum((5, 6, 7, 8, 9), (False, False, False, True, True), (0, 0, 0, -1.0, -1.0), 1.0)] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action_logprobs(tiny_model, collate(datums, 0))
        TorchSampler(tiny_model, [1], pad_token_id=0).sample([[5, 6, 7]] * 2, max_tokens=3, temperature=1.0, seed=0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
