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


def test_inverse_cdf_draws_follow_the_distribution():
    """Frequencies of 40,000 draws match the probabilities; a zero-probability token (and one
    cut by top-p) is never drawn; the logprob returned is the token's, renormalised."""
    from mathrl.rollout.sampler import _draw

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits_BV = torch.log(probs).expand(40_000, -1)
    gen = torch.Generator().manual_seed(0)
    tok_B, lp_B = _draw(logits_BV, 1.0, 1.0, gen)
    freq = torch.bincount(tok_B, minlength=5).float() / len(tok_B)
    assert torch.allclose(freq, probs, atol=0.01), freq
    assert freq[4] == 0
    assert torch.allclose(lp_B, torch.log(probs)[tok_B], atol=1e-5)
    tok_B, lp_B = _draw(logits_BV, 1.0, 0.8, gen)  # nucleus {0, 1, 2}: mass 0.9 >= 0.8
    freq = torch.bincount(tok_B, minlength=5).float() / len(tok_B)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=0.01), freq
    assert torch.allclose(lp_B, torch.log(probs / 0.9)[tok_B], atol=1e-5)
    rows = [torch.Generator().manual_seed(i) for i in range(4000)]
    tok_B, _ = _draw(logits_BV[:4000] * 0.5, 0.5, 1.0, rows)  # per-row streams; T=0.5 undoes the scaling
    freq = torch.bincount(tok_B, minlength=5).float() / len(tok_B)
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_sampler_with_merged_lora_matches_the_trainers_forward(tiny_model):
    """After an update, the sampler runs a copy of the policy with LoRA merged in; its token
    logprobs must equal the trainer's (shared-prefix, LM-head-on-actions) forward of the
    LoRA policy: what the importance ratio assumes."""
    import copy

    from mathrl.models import sync_weights, wrap_lora
    from mathrl.rl.batching import action_logprobs, collate, trajectory_datums
    from mathrl.types import Trajectory, Transition

    torch.manual_seed(0)
    policy = wrap_lora(copy.deepcopy(tiny_model), rank=4)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    sampler_model = copy.deepcopy(tiny_model)
    sync_weights(policy, sampler_model)
    sampler = TorchSampler(sampler_model, [EOS], pad_token_id=0)
    prompts = [p for p in SHARED for _ in range(2)]
    got = sampler.sample(prompts, max_tokens=8, temperature=1.0, seed=1)
    trajectories = [Trajectory((Transition(tuple(p), c, "", 0.0, False),)) for p, c in zip(prompts, got, strict=True)]
    datums = [d for t in trajectories for d in trajectory_datums(t, 1.0)]
    batch = collate(datums, pad_token_id=0)
    with torch.no_grad():
        logp_BT, _ = action_logprobs(policy, batch)
    trainer = logp_BT[batch.action_mask_BT > 0]
    sampled = batch.sample_logprobs_BT[batch.action_mask_BT > 0]
    assert len(trainer) == sum(len(c.tokens_T) for c in got)
    assert torch.allclose(trainer, sampled, atol=1e-4), (trainer - sampled).abs().max()


@pytest.mark.slow
def test_greedy_on_the_real_model_matches_hf_generate():
    """The embedded model in fp32 on real GSM8K prompts (eval's rendering): token-for-token
    the replies of plain HF generate, one prompt at a time."""
    from mathrl.data.datasets import load_problems
    from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_for_inference
    from mathrl.prompts import math_messages
    from mathrl.rollout.renderer import Renderer

    model, tokenizer = load_for_inference(EMBEDDED_MODEL, torch.float32)
    problems = load_problems("gsm8k", "test", data_dir=_DATA, limit=4).problems
    prompts = [Renderer(tokenizer).initial_tokens(math_messages(p.problem)) for p in problems]
    eos = eos_token_ids(tokenizer)
    got = TorchSampler(model, eos, tokenizer.pad_token_id).sample(
        prompts, max_tokens=48, temperature=0.0, seed=0, row_seeds=[0, 1, 2, 3]
    )
    for prompt, completion in zip(prompts, got, strict=True):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=48, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()  # fmt: skip
        cut = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
        assert list(completion.tokens_T) == out[:cut]


_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"
