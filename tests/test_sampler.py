"""The KV-cache sampler against plain transformers: greedy outputs and logprobs."""

import pytest
import torch

from mathrl.rollout.sampler import TorchSampler

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [5, 6, 7, 8, 9]]
# All share [3, 4, 5]: the sampler computes that prefix once and pads in the middle.
SHARED = [[3, 4, 5, 6, 7, 8], [3, 4, 5, 9], [3, 4, 5, 10, 11, 12, 13], [3, 4, 5, 6, 7, 8]]
EOS = 1


def _hf_greedy(model, prompt, max_tokens):
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0,
    )  # fmt: skip
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.mark.parametrize("prompts", [PROMPTS, SHARED])
def test_greedy_matches_hf_generate_with_padding_and_shared_prefixes(tiny_model, prompts):
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    got = sampler.sample(prompts, max_tokens=12, temperature=0.0, seed=0)
    for prompt, completion in zip(prompts, got, strict=True):
        assert list(completion.tokens_T) == _hf_greedy(tiny_model, prompt, 12)
        assert completion.finish_reason == ("stop" if completion.tokens_T[-1] == EOS else "length")
        assert len(completion.logprobs_T) == len(completion.tokens_T)


def _forward_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return [logp[n - 1 + i, tok].item() for i, tok in enumerate(completion)]


def test_sampled_logprobs_match_a_plain_forward_pass(tiny_model):
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    for temperature in (1.0, 0.7):
        prompts = [p for p in PROMPTS + SHARED for _ in range(3)]
        got = sampler.sample(prompts, max_tokens=10, temperature=temperature, seed=3)
        for prompt, completion in zip(prompts, got, strict=True):
            expected = _forward_logprobs(tiny_model, prompt, list(completion.tokens_T), temperature)
            assert torch.allclose(torch.tensor(completion.logprobs_T), torch.tensor(expected), atol=1e-4)


def test_seed_fixes_the_samples(tiny_model):
    sampler = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    prompts = [PROMPTS[0]] * 8
    a = sampler.sample(prompts, max_tokens=8, temperature=1.0, seed=11)
    b = sampler.sample(prompts, max_tokens=8, temperature=1.0, seed=11)
    c = sampler.sample(prompts, max_tokens=8, temperature=1.0, seed=12)
    assert a == b
    assert a != c
    assert len({x.tokens_T for x in a}) > 1  # the group's copies are sampled independently


def test_chunking_does_not_change_greedy_results(tiny_model):
    big = TorchSampler(tiny_model, [EOS], pad_token_id=0)
    small = TorchSampler(tiny_model, [EOS], pad_token_id=0, max_batch=1)
    prompts = PROMPTS * 2
    a = big.sample(prompts, max_tokens=6, temperature=0, seed=0)
    b = small.sample(prompts, max_tokens=6, temperature=0, seed=0)
    assert [x.tokens_T for x in a] == [x.tokens_T for x in b]
    for x, y in zip(a, b, strict=True):  # batch shape changes float summation order only
        assert torch.allclose(torch.tensor(x.logprobs_T), torch.tensor(y.logprobs_T), atol=1e-5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from mathrl.rollout.sampler import _nucleus

    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _nucleus(logp, 0.75).exp()
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept = _nucleus(logp, 0.45).exp()  # the top token alone reaches 0.45
    assert torch.allclose(kept, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_tiny_top_p_samples_the_greedy_tokens(tiny_model):
    sampler = TorchSampler(tiny_model, eos_token_ids=[EOS], pad_token_id=0)
    prompts = [[5, 6, 7], [8, 9]]
    greedy = sampler.sample(prompts, max_tokens=6, temperature=0, seed=0)
    nucleus = sampler.sample(prompts, max_tokens=6, temperature=1.0, top_p=1e-6, seed=0)
    assert [c.tokens_T for c in greedy] == [c.tokens_T for c in nucleus]
    assert all(abs(lp) < 1e-5 for c in nucleus for lp in c.logprobs_T)


def test_per_row_seeds_make_samples_independent_of_the_batch_even_when_rows_leave_it(tiny_model):
    """With row seeds a finished row leaves the batch (cache compaction); every row must
    still be exactly what it is when sampled alone."""
    sampler = TorchSampler(tiny_model, eos_token_ids=[1, 3, 5, 7, 11, 13], pad_token_id=0)
    prompts = [[20 + i, 30 + 2 * i, 40] for i in range(8)]
    seeds = [100 + 7 * i for i in range(8)]
    batched = sampler.sample(prompts, max_tokens=24, temperature=1.0, seed=0, row_seeds=seeds)
    alone = [
        sampler.sample([p], max_tokens=24, temperature=1.0, seed=0, row_seeds=[s])[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert [c.tokens_T for c in batched] == [c.tokens_T for c in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.logprobs_T == pytest.approx(a.logprobs_T, abs=1e-4)
    lengths = {len(c.tokens_T) for c in batched}
    assert len(lengths) > 2 and min(lengths) < 12, lengths  # rows did finish at different steps
