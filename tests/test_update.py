"""The GRPO update itself (``mathrl.train.rl._update``) on a tiny random Llama built in-test:
micro-batching and ``num_substeps`` give the update they claim, checked against a reference
written here without micro-batches, without prompt sharing and without ``Batch``; and
``run_groups`` on a real multi-sample batch feeds the update token-exactly."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mathrl.rl.batching import ActionScorer, Datum, collate, score, trajectory_datums
from mathrl.rl.losses import LOSSES
from mathrl.train.rl import TrainConfig, _datums, _update, clip_range

LR = 0.05


def _datums_3x3() -> list[Datum]:
    """3 problems x 3 samples: shared prompts, answers of different lengths, off-policy logprobs."""
    g = torch.Generator().manual_seed(2)
    datums = []
    for problem in range(3):
        prompt = torch.randint(3, 97, (4 + 3 * problem,), generator=g).tolist()
        for sample in range(3):
            n = 2 + (problem + 2 * sample) % 5
            action = torch.randint(3, 97, (n,), generator=g).tolist()
            logps = (-torch.rand(n, generator=g) * 3 - 1).tolist()
            datums.append(Datum(tuple(prompt + action), (False,) * len(prompt) + (True,) * n,
                                (0.0,) * len(prompt) + tuple(logps), float(sample - 1) + 0.25 * problem))  # fmt: skip
    return datums


def _sgd(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Plain SGD (an update is -lr x gradient, so a wrongly scaled gradient shows, unlike with
    Adam's first step) and a decaying schedule (so a substep that skips scheduler.step shows)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - 0.25 * i)


def _reference_logp(model: torch.nn.Module, d: Datum) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, sample logp, mask) of one sequence's predicted tokens, by a plain forward."""
    ids = torch.tensor([d.tokens_T])
    logp_all = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(d.action_mask_T[1:], dtype=torch.float32)
    return logp * mask, torch.tensor(d.sample_logprobs_T[1:]) * mask, mask


def _reference_loss(model: torch.nn.Module, datums: list[Datum], cfg: TrainConfig) -> torch.Tensor:
    """The minibatch loss written out for token_mean and seq_mean: one sequence at a time."""
    per_seq, lengths = [], []
    for d in datums:
        logp, sample, mask = _reference_logp(model, d)
        loss = LOSSES[cfg.loss_fn](logp[None], sample[None], torch.tensor([d.advantage]), mask[None],
                                   *clip_range(cfg))[0]  # fmt: skip
        per_seq.append((loss * mask).sum())
        lengths.append(mask.sum())
    if cfg.loss_agg == "token_mean":
        return torch.stack(per_seq).sum() / torch.stack(lengths).sum()
    assert cfg.loss_agg == "seq_mean"
    return (torch.stack(per_seq) / torch.stack(lengths)).mean()


def _reference_update(model: torch.nn.Module, datums: list[Datum], cfg: TrainConfig) -> None:
    """num_substeps SGD steps on consecutive slices, each with its own normalisation, gradient
    clipping, and a scheduler step."""
    optimizer, scheduler = _sgd(model)
    n = len(datums)
    bounds = [round(i * n / cfg.num_substeps) for i in range(cfg.num_substeps + 1)]
    for lo, hi in itertools.pairwise(bounds):
        optimizer.zero_grad()
        _reference_loss(model, datums[lo:hi], cfg).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()


def _run_update(model: torch.nn.Module, datums: list[Datum], cfg: TrainConfig) -> dict[str, float]:
    optimizer, scheduler = _sgd(model)
    batch = collate(datums, 0, share_prefix=True)
    return _update(ActionScorer(model), model, None, optimizer, scheduler, batch, cfg, torch.device("cpu"))


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("loss_fn", "loss_agg", "num_substeps", "max_grad_norm"),
    [
        ("importance_sampling", "token_mean", 1, 0.0),  # the default loss, unclipped gradient
        ("ppo", "seq_mean", 1, 0.0),
        ("ppo", "token_mean", 2, 1.0),  # two minibatches, each normalised on its own, clipped
        ("importance_sampling", "seq_mean", 3, 1.0),
        ("ppo_clip_higher", "token_mean", 2, 0.0),
        ("cispo", "token_mean", 1, 0.0),
        ("gspo", "seq_mean", 2, 1.0),
    ],
)
def test_update_equals_the_reference_micro_batched_or_not(tiny_model, loss_fn, loss_agg, num_substeps, max_grad_norm):
    datums = _datums_3x3()
    clip = {"ppo_clip_low": 0.1, "ppo_clip_high": 0.3} if loss_fn == "ppo_clip_higher" else {}
    cfg = replace(TrainConfig(), loss_fn=loss_fn.removesuffix("_clip_higher"), loss_agg=loss_agg,
                  num_substeps=num_substeps, max_grad_norm=max_grad_norm, train_bf16=False, **clip)  # fmt: skip
    start = copy.deepcopy(tiny_model).train().float()
    reference = copy.deepcopy(start)
    _reference_update(reference, datums, cfg)
    moved = _max_diff(reference, start)
    assert moved > 1e-3  # a real update
    batch = collate(datums, 0)
    for tokens in (10_000, 24, 1):  # one micro-batch; a few; one sequence each
        n_micro = len(batch.micro_batches(tokens))
        assert n_micro == 1 if tokens == 10_000 else n_micro == 9 if tokens == 1 else 1 < n_micro < 9
        model = copy.deepcopy(start)
        _run_update(model, datums, replace(cfg, micro_batch_tokens=tokens))
        assert _max_diff(model, reference) < 1e-5 * max(moved, 1.0), tokens


def test_more_substeps_is_a_different_update(tiny_model):
    """num_substeps really takes several steps (the reference above would also pass if both ignored it)."""
    datums = _datums_3x3()
    cfg = replace(TrainConfig(), train_bf16=False, max_grad_norm=0.0)
    one, two = copy.deepcopy(tiny_model).train(), copy.deepcopy(tiny_model).train()
    _run_update(one, datums, cfg)
    _run_update(two, datums, replace(cfg, num_substeps=2))
    assert _max_diff(one, two) > 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    from mathrl import EMBEDDED_MODEL
    from mathrl.models import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


def test_run_groups_batch_feeds_the_update_token_exactly(tokenizer):
    """A real multi-sample batch: run_groups samples 4 answers to each of 2 arithmetic problems with
    a tiny random model on the real tokenizer and chat template; the trainer's logprobs of the
    collated batch (prompts shared) equal the sampler's, and the update moves the weights."""
    from mathrl.envs.registry import make_dataset
    from mathrl.models import eos_token_ids
    from mathrl.rollout.renderer import Renderer
    from mathrl.rollout.runner import run_groups
    from mathrl.rollout.sampler import TorchSampler

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    dataset, _ = make_dataset("arithmetic", {}, 2, 0)
    sampler = TorchSampler(copy.deepcopy(model), eos_token_ids(tokenizer), tokenizer.pad_token_id, tokenizer=tokenizer)
    groups = run_groups(dataset.get_batch(0), 4, sampler, Renderer(tokenizer), max_tokens=5, temperature=1.0,
                        seed=0, max_turns=1)  # fmt: skip
    assert [len(g.trajectories_G) for g in groups] == [4, 4]
    for g in groups:
        prompts = {t.transitions[0].ob_tokens_T for t in g.trajectories_G}
        assert len(prompts) == 1  # the group's samples continue one prompt
        answers = {t.transitions[0].ac.tokens_T for t in g.trajectories_G}
        assert len(answers) > 1  # different samples
        assert all(r in (0.0, 1.0) for r in g.rewards_G)
    assert (
        groups[0].trajectories_G[0].transitions[0].ob_tokens_T != groups[1].trajectories_G[0].transitions[0].ob_tokens_T
    )

    # a random model is always wrong: advantages +-1 by hand so that the update has a direction
    cfg = replace(TrainConfig(), train_bf16=False, learning_rate=1e-2)
    assert _datums(groups, cfg) == []  # constant groups carry no signal
    trajs = [t for g in groups for t in g.trajectories_G]
    datums = [d for i, t in enumerate(trajs) for d in trajectory_datums(t, (-1.0) ** i)]
    assert len(datums) == 8
    batch = collate(datums, tokenizer.pad_token_id)
    assert batch.prefix_ids_PL.shape[0] == 2  # one shared prompt per problem
    with torch.no_grad():
        logp_BT, _ = score(ActionScorer(model), batch, 1.0)
    mask = batch.action_mask_BT
    assert mask.sum() == sum(len(t.transitions[0].ac.tokens_T) for g in groups for t in g.trajectories_G)
    assert float(((logp_BT - batch.sample_logprobs_BT).abs() * mask).max()) < 1e-3

    from mathrl.train.run import make_optimizer

    policy = copy.deepcopy(model).train()
    before = copy.deepcopy(policy)
    optimizer, scheduler = make_optimizer(policy, cfg, 1)
    stats = _update(ActionScorer(policy), policy, None, optimizer, scheduler, batch, cfg, torch.device("cpu"))
    assert abs(stats["optim/kl_sample_train_v1"]) < 1e-3 and stats["optim/ratio_mean"] == pytest.approx(1, abs=1e-3)
    assert _max_diff(policy, before) > 1e-3
