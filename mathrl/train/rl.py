"""GRPO with verifiable rewards, top to bottom in one function: ``train(cfg)``.

Each step: draw ``groups_per_batch`` problems, sample ``group_size`` episodes for each
(one turn, or several with tool calls: token-exact, see :mod:`mathrl.rollout.renderer`),
let the env grade them, advantage = reward - group mean, compute a policy-gradient loss
from a registry on the sampled tokens only, take ``num_substeps`` optimizer steps, log,
checkpoint.

What differs from the GRPO paper, on purpose (as in tinker-cookbook):
- advantages are not divided by the group std unless ``normalize_advantages_by_std``
  (Dr. GRPO's argument), and constant-reward groups are dropped by default;
- the default loss is importance sampling (ratio * A, no clipping); ``loss_fn=ppo`` clips
  (``cispo``, ``gspo`` and the aggregations: :mod:`mathrl.rl.losses`; DAPO's overlong and
  dynamic-sampling options are off by default);
- the KL penalty is off by default; when on, it is the k3 estimator against the frozen
  starting weights (the base model with adapters disabled, for LoRA);
- sampling runs on a bf16 copy of the policy with LoRA merged in, refreshed after every
  update; the trainer's logprobs are compared with the sampler's (``optim/kl_sample_train_v1``)
  so a mismatch between the two is visible, and the importance ratio corrects for it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from mathrl import parallel
from mathrl.checkpoint import latest_checkpoint, load_weights
from mathrl.config import ConfigError
from mathrl.envs.base import GroupBuilder, SingleTurnBuilder
from mathrl.envs.registry import make_dataset
from mathrl.eval.metrics import summarize, test_metrics
from mathrl.eval.runner import EvalItem, GenSettings, to_results
from mathrl.eval.runner import evaluate as run_eval_items
from mathrl.grading import use_grader
from mathrl.models import base_of, check_model_name, eos_token_ids, load_model, load_tokenizer
from mathrl.parallel import World
from mathrl.plots import plot_metrics
from mathrl.prompts import find_prompt_format
from mathrl.report import report_safely
from mathrl.rl.advantages import group_advantages, is_constant, overlong_penalty
from mathrl.rl.batching import ActionScorer, Batch, Datum, action_logprobs, collate, score, trajectory_datums
from mathrl.rl.losses import AGGREGATIONS, LOSSES, kl_k3
from mathrl.rollout.backend import LocalBackend, context_length
from mathrl.rollout.metrics import group_metrics
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.runner import run_groups
from mathrl.rollout.sampler import Sampler, TorchSampler
from mathrl.tracking import ProgressBar, closes_trackers, write_jsonl
from mathrl.train.configs import TrainConfig as TrainConfig  # re-exported
from mathrl.train.run import Run, make_optimizer, make_policy, restore_optimizer, restore_weights, start_run
from mathrl.train.run import save as checkpoint
from mathrl.types import TrajectoryGroup

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Keys that may change between a run and its resumption without changing what it computes.
_RESUMABLE_CHANGES = {
    "max_steps",
    "eval_every",
    "save_every",
    "log_path",
    "num_threads",
    "save_rollouts",
    "micro_batch_tokens",
}


@closes_trackers
def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) GRPO; return the run directory."""
    check_model_name(cfg.model_name, "model_name")  # before anything is created
    _check_sampler(cfg)
    use_grader(cfg.grader)
    if cfg.overlong_buffer > cfg.max_tokens:
        raise ConfigError(f"overlong_buffer={cfg.overlong_buffer}: must be at most max_tokens={cfg.max_tokens}")
    start = _starting_checkpoint(cfg)
    cfg = replace(cfg, load_checkpoint_path=str(start) if start else None)  # config.json: what was loaded
    dataset, env_options = make_dataset(cfg.env, cfg.env_args, cfg.groups_per_batch, cfg.seed)
    if find_prompt_format(cfg.prompt_format).render is not None and hasattr(env_options, "sandbox"):
        raise ConfigError(f"prompt_format={cfg.prompt_format}: single-turn envs only; env={cfg.env} (tool calls) "
                          "needs prompt_format=chat and a model with a chat template")  # fmt: skip
    tokenizer = load_tokenizer(cfg.model_name, cfg.prompt_format)  # no chat template: refused before log_path
    resolved = {"sandbox": _sandbox_isolation(env_options)} if hasattr(env_options, "sandbox") else {}
    cfg, run = start_run(cfg, f"runs/{cfg.env}-{datetime.now():%Y%m%d-%H%M%S}", _RESUMABLE_CHANGES, resolved)
    world, device, log_path = run.world, run.device, run.log_path

    # --- model, sampler, data -------------------------------------------------------------
    renderer = Renderer(tokenizer, cfg.tool_parser, cfg.prompt_format)
    policy, _ = make_policy(
        lambda dtype: _load_base(cfg, start, dtype), lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        train_bf16=cfg.train_bf16, parallel_mode=cfg.parallel, world=world, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )  # fmt: skip
    ref_model = (
        _load_base(cfg, start).eval().requires_grad_(False) if cfg.kl_penalty_coef and not cfg.lora_rank else None
    )
    if start is not None and _is_adapter(start) and cfg.load_checkpoint_mode == "continue":
        load_weights(policy, start, cfg.lora_rank)  # the same adapter keeps training
    elif start is not None and cfg.lora_rank:  # new adapters over the loaded weights: say so for loaders
        policy.peft_config["default"].base_model_name_or_path = str(start)  # type: ignore[index, operator, union-attr]
    start_step = restore_weights(run, policy, cfg.lora_rank)
    policy.to(device).train()
    # The trainer calls the scorer (wrapped in DDP or sharded by FSDP2 under torchrun), never the
    # policy's inner modules. No requires_grad_(False) on the sampler's model: measured on torch
    # 2.13 CPU, bf16 decoding with frozen parameters ran 5x slower and peaked at 12 GB.
    scorer = parallel.wrap(ActionScorer(policy), cfg.parallel, world, device)
    sampler = _make_sampler(cfg, run, start, tokenizer, device) if world.main else None
    if ref_model is not None:
        ref_model.to(device)
    optimizer, scheduler = make_optimizer(scorer, cfg, max(cfg.max_steps * cfg.num_substeps, 1))
    restore_optimizer(run, optimizer, scheduler, cfg.num_substeps)

    def push_weights(version: int) -> None:
        """The sampler samples from the current weights from now on (every rank enters: FSDP2 gathers)."""
        with parallel.full_weights(scorer):
            if sampler is not None:
                sampler.update_weights(policy, version)

    # The weights version: how many updates made them (a resumed run counts from its step). Each
    # sampled batch carries the version it was sampled with; staleness is the difference.
    version = start_step
    push_weights(version)
    logger = run.logger(start_step)
    if run.checkpoint is not None and world.main:
        print(f"resuming {log_path} from its checkpoint at step {start_step} ({run.checkpoint.name})")

    test_items = [_eval_item(i, b) for i, b in enumerate(dataset.test_builders())]
    if world.main:
        print(_memory_line(cfg, base_of(policy).config, renderer, test_items, world))
    eval_backend = (
        LocalBackend(base_of(policy), tokenizer,
                     tool_parser=cfg.tool_parser, sampler=sampler, prompt_format=cfg.prompt_format)
        if sampler is not None else None
    )  # fmt: skip
    max_context = context_length(base_of(policy))

    def evaluate(step: int) -> dict[str, float]:
        """Test metrics with mathrl eval's code (pass@1 with its 95% interval, pass@k, maj@k,
        and the tool metrics of multi-turn envs), on the sampler's current weights."""
        assert eval_backend is not None
        t0 = time.time()
        seed = _step_seed(cfg.seed, step, "eval")
        items = test_items
        settings = GenSettings(cfg.eval_n, cfg.max_tokens, cfg.eval_temperature, 1.0, seed, cfg.max_turns)
        episodes = any(item.make_env for item in items)  # tool episodes hold a sandbox session each
        rows = run_eval_items(eval_backend, items, settings, out_path=log_path / "eval" / f"step_{step:06d}.jsonl",
                              chunk_size=64 if episodes else len(items))  # fmt: skip
        return {**test_metrics(summarize("test", to_results(rows))), "time/eval": time.time() - t0}

    def generate(step: int) -> Sampled:
        """Step ``step``'s groups, tagged with the weights version current when sampling began.
        With dynamic_sampling, extra batches are drawn until groups_per_batch groups have
        reward spread (or dynamic_sampling_max_draws extra batches were drawn)."""
        assert sampler is not None
        version, t0 = sampler.version, time.time()

        def draw(k: int) -> list[TrajectoryGroup]:
            # extra draw k > 0: the problems of a batch index past every step's, its own sampling seed
            index = step if k == 0 else cfg.max_steps + step * cfg.dynamic_sampling_max_draws + k - 1
            return run_groups(
                dataset.get_batch(index), cfg.group_size, sampler, renderer,
                max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                seed=_step_seed(cfg.seed, step, "train") + k, max_turns=cfg.max_turns, max_context=max_context,
            )  # fmt: skip

        if not cfg.dynamic_sampling:
            return Sampled(draw(0), version, time.time() - t0)
        groups, kept, draws = dynamic_sample(draw, lambda g: _has_spread(g, cfg), cfg.groups_per_batch,
                                             cfg.dynamic_sampling_max_draws)  # fmt: skip
        stats = {"dynamic_sampling/extra_draws": float(draws),
                 "dynamic_sampling/groups_sampled": float(len(groups)),
                 "dynamic_sampling/groups_kept": float(len(kept))}  # fmt: skip
        return Sampled(kept, version, time.time() - t0, groups, stats)

    # Sampling runs ahead of training by up to max_off_policy_steps batches, in one thread.
    ahead = ThreadPoolExecutor(1, thread_name_prefix="sampling") if cfg.max_off_policy_steps and world.main else None
    pending: dict[int, Future[Sampled]] = {}
    bar = ProgressBar("train", cfg.max_steps, start_step, progress and world.main, "test/env/all/correct",
                      "test correct", _bar_summary, digits=3)  # fmt: skip
    run_start = time.time()
    try:
        # --- the loop ---------------------------------------------------------------------
        for step in range(start_step, cfg.max_steps):
            t_step = time.time()
            metrics: dict[str, float] = {}
            datums: list[Datum] = []
            groups: list[TrajectoryGroup] = []
            if world.main:
                if cfg.eval_every and step % cfg.eval_every == 0:
                    metrics |= evaluate(step)

                # 1. sample group_size completions for each problem, graded by the env
                t0 = time.time()
                if ahead is not None:
                    for s in range(step, min(step + cfg.max_off_policy_steps + 1, cfg.max_steps)):
                        if s not in pending:
                            pending[s] = ahead.submit(generate, s)
                    sampled = pending.pop(step).result()
                else:
                    sampled = generate(step)
                groups = sampled.groups
                metrics |= group_metrics(sampled.all_groups or groups) | sampled.stats
                metrics["time/sample"] = sampled.seconds
                metrics["time/wait_for_samples"] = time.time() - t0
                # 2. groups sampled by too old weights are dropped; advantages -> training sequences
                staleness = version - sampled.version
                metrics["optim/staleness_mean"] = float(staleness)
                metrics["optim/groups_dropped_stale"] = (
                    float(len(groups)) if staleness > cfg.max_off_policy_steps else 0.0
                )
                datums = _datums(groups, cfg) if staleness <= cfg.max_off_policy_steps else []
                metrics["optim/num_sequences"] = len(datums)
            datums = parallel.broadcast(datums, world)

            # 3. policy-gradient update(s), then new weights to the sampler
            t0 = time.time()
            if datums:
                batch = collate(datums, tokenizer.pad_token_id, share_prefix=share_prefix(cfg, world))
                metrics |= _update(scorer, policy, ref_model, optimizer, scheduler, batch, cfg, device, world)
                version += 1
                push_weights(version)
            else:
                for _ in range(cfg.num_substeps):
                    scheduler.step()
            metrics["time/train"] = time.time() - t0

            # 4. log, keep rollouts, checkpoint (logged first: a kill between the two redoes the step)
            if world.main:
                if cfg.save_rollouts:
                    _save_rollouts(log_path, step, groups, tokenizer, cfg)
                metrics |= {"progress/batch": step, "optim/lr": float(scheduler.get_last_lr()[0])}
                metrics["time/step"] = time.time() - t_step
                metrics["time/total"] = time.time() - run_start
                metrics["mem/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                assert logger is not None
                logger.log(step, metrics)
                bar.update(step, metrics)
                if "test/env/all/correct" in metrics:
                    plot_metrics(logger.rows(), log_path / "plot.png", title=f"{cfg.env} | {cfg.model_name}")
                    report_safely(log_path)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                checkpoint(run, step + 1, scorer, tokenizer, optimizer, scheduler)
    finally:
        if ahead is not None:
            for future in pending.values():
                future.cancel()
            ahead.shutdown(wait=True)

    # --- the end: final checkpoint, then evaluate exactly those weights --------------------
    if start_step < cfg.max_steps or latest_checkpoint(log_path) is None:
        checkpoint(run, cfg.max_steps, scorer, tokenizer, optimizer, scheduler, final=True)
    if world.main:
        assert logger is not None
        final = evaluate(cfg.max_steps)
        logger.log(cfg.max_steps, {**final, "time/total": time.time() - run_start})
        plot_metrics(logger.rows(), log_path / "plot.png", title=f"{cfg.env} | {cfg.model_name}")
        report_safely(log_path)
        bar.close(final)
        _warn_truncation(logger.rows())
    parallel.barrier(world)
    return log_path


_ONE_PROCESS = World()


@dataclass(frozen=True)
class Sampled:
    """One step's sampled groups, the weights version that sampled them, and how long it took."""

    groups: list[TrajectoryGroup]
    version: int
    seconds: float
    all_groups: list[TrajectoryGroup] | None = None  # dynamic sampling: every group drawn
    stats: dict[str, float] = field(default_factory=dict)


def dynamic_sample(
    draw: Callable[[int], list[TrajectoryGroup]], keep: Callable[[TrajectoryGroup], bool], target: int, max_extra: int
) -> tuple[list[TrajectoryGroup], list[TrajectoryGroup], int]:
    """DAPO's dynamic sampling: ``draw(0)``, then ``draw(1)``, ... until ``target`` groups pass
    ``keep`` or ``max_extra`` extra draws were made. Returns (every group drawn, the first
    ``target`` kept ones, the number of extra draws)."""
    drawn = draw(0)
    extra = 0
    while sum(map(keep, drawn)) < target and extra < max_extra:
        extra += 1
        drawn += draw(extra)
    return drawn, [g for g in drawn if keep(g)][:target], extra


def _memory_line(cfg: TrainConfig, config: Any, renderer: Renderer, items: list[EvalItem], world: World) -> str:
    """The start-up estimate of memory per device (:mod:`mathrl.memory`), prompts sized by a test problem."""
    from mathrl.memory import estimate

    prompt = len(renderer.initial_tokens(list(items[0].messages), ())) if items and items[0].messages else 512
    return estimate(
        config, lora_rank=cfg.lora_rank, group_size=cfg.group_size, groups_per_batch=cfg.groups_per_batch,
        max_tokens=cfg.max_tokens * (cfg.max_turns if items and not items[0].messages else 1),
        prompt_tokens=prompt, micro_batch_tokens=cfg.micro_batch_tokens, world_size=world.size,
        parallel=cfg.parallel, gradient_checkpointing=cfg.gradient_checkpointing, sampler=cfg.sampler,
    ).describe()  # fmt: skip


def _check_sampler(cfg: TrainConfig) -> None:
    if cfg.sampler == "remote" and not (cfg.base_url and cfg.api_model):
        raise ConfigError(
            "sampler=remote needs base_url (e.g. http://127.0.0.1:8000/v1) and api_model (its model name)"
        )
    if cfg.sampler == "local" and (cfg.base_url or cfg.api_model):
        raise ConfigError("base_url/api_model are for sampler=remote; pass sampler=remote or drop them")
    if cfg.sampler == "remote":  # reachable and serving api_model, before anything is loaded or created
        from mathrl.rollout.remote import check_server

        check_server(cfg.base_url, cfg.api_model)


def _make_sampler(cfg: TrainConfig, run: Run, start: Path | None, tokenizer: Any, device: torch.device) -> Sampler:
    """The in-process sampler on a bf16 copy of the policy, or a server's (weights go to log_path/weights)."""
    if cfg.sampler == "remote":
        from mathrl.rollout.remote import RemoteSampler

        return RemoteSampler(
            cfg.base_url, cfg.api_model, run.log_path / "weights", lora=bool(cfg.lora_rank),
            keep_versions=cfg.max_off_policy_steps + 2,
        )  # fmt: skip
    sampler_model = _load_base(cfg, start, getattr(torch, cfg.sample_dtype))
    sampler_model.to(device)  # type: ignore[arg-type]
    return TorchSampler(sampler_model, eos_token_ids(tokenizer), tokenizer.pad_token_id, tokenizer=tokenizer)


def share_prefix(cfg: TrainConfig, world: World) -> bool:
    """Whether a group's prompt is computed once in the update (:class:`~mathrl.rl.batching.Batch`).
    Not with gradient checkpointing (which drops the prompt's key/value cache) nor under FSDP2:
    its backward hooks sit on each layer's outputs, and the prompt's keys and values reach the
    backward through the cache instead, after the layer's weights were resharded."""
    return not cfg.gradient_checkpointing and not (world.distributed and cfg.parallel == "fsdp")


def _is_cap(cfg: TrainConfig) -> float:
    """The importance-weight cap in force (0 = none): is_cap, or by default 2 when off-policy."""
    if cfg.is_cap is not None:
        return cfg.is_cap
    return 2.0 if cfg.max_off_policy_steps else 0.0


def _update(
    scorer: torch.nn.Module,
    policy: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: Batch,
    cfg: TrainConfig,
    device: torch.device,
    world: World = _ONE_PROCESS,
) -> dict[str, float]:
    """``num_substeps`` optimizer steps over consecutive minibatches of ``batch``.

    Every rank holds the whole batch; each micro-batch's rows are shared out over the ranks
    (:func:`mathrl.parallel.shard`). Per-token weights come from the whole minibatch, and the
    loss is scaled by the world size because DDP and FSDP2 average gradients over ranks: the
    reduced gradient is the one process's gradient on the same minibatch.
    """
    stats: dict[str, list[float]] = {}  # key -> [numerator, denominator], summed over ranks

    def add(key: str, numerator: float, denominator: float) -> None:
        acc = stats.setdefault(key, [0.0, 0.0])
        acc[0] += numerator
        acc[1] += denominator

    cap = _is_cap(cfg)
    clip_low, clip_high = clip_range(cfg)
    grad_norms = []
    bounds = np.linspace(0, len(batch), cfg.num_substeps + 1).round().astype(int)
    for sub, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi <= lo:
            continue
        minibatch = batch.slice(lo, hi)
        weights_BT = AGGREGATIONS[cfg.loss_agg](minibatch.action_mask_BT, cfg.max_tokens) * world.size
        optimizer.zero_grad(set_to_none=True)
        ranges = minibatch.micro_batches(cfg.micro_batch_tokens)
        for k, (m, m_end) in enumerate(ranges):
            rows, real = parallel.shard(m_end - m, world)
            micro = _to(minibatch.select([m + r for r in rows]), device)
            width = micro.input_ids_BT.shape[1]
            w_BT = weights_BT[[m + r for r in rows], :width].to(device) * float(real)
            mask_BT = micro.action_mask_BT * float(real)
            with parallel.no_sync(scorer, last=k == len(ranges) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train_bf16):
                    logp_BT, entropy_BT = score(scorer, micro, cfg.temperature)
                sample_logp_BT = micro.sample_logprobs_BT
                if cap:  # truncated importance sampling: the weight pi/pi_sample is at most cap
                    floor_BT = logp_BT.detach() - math.log(cap)
                    add("optim/frac_is_capped", float(((floor_BT > sample_logp_BT).float() * mask_BT).sum()),
                        float(mask_BT.sum()))  # fmt: skip
                    sample_logp_BT = torch.maximum(sample_logp_BT, floor_BT)
                loss_BT = LOSSES[cfg.loss_fn](
                    logp_BT, sample_logp_BT, micro.advantages_B, micro.action_mask_BT, clip_low, clip_high
                )
                if cfg.kl_penalty_coef:
                    ref_logp_BT = _ref_logprobs(scorer, policy, ref_model, micro, cfg, device)
                    kl_BT = kl_k3(logp_BT, ref_logp_BT)
                    loss_BT = loss_BT + cfg.kl_penalty_coef * kl_BT
                    add("optim/kl_ref", float((kl_BT * mask_BT).sum()), float(mask_BT.sum()))
                loss = (loss_BT * w_BT).sum()
                loss.backward()
            n_tok = float(mask_BT.sum())
            diff_BT = (micro.sample_logprobs_BT - logp_BT.detach()) * mask_BT
            ratio_BT = torch.exp(-diff_BT)
            if sub == 0:  # before any update: pure sampler/trainer mismatch (and staleness)
                add("optim/kl_sample_train_v1", float(diff_BT.sum()), n_tok)
                add("optim/kl_sample_train_v2", float(0.5 * (diff_BT**2).sum()), n_tok)
            add("optim/entropy", float((entropy_BT * mask_BT).sum()), n_tok)
            add("optim/ratio_mean", float((ratio_BT * mask_BT).sum()), n_tok)
            clipped = ((ratio_BT > 1 + clip_high) | (ratio_BT < 1 - clip_low)).float() * mask_BT
            add("optim/frac_ratio_outside_clip", float(clipped.sum()), n_tok)
            add("optim/loss", float(loss.detach()) / world.size, 0.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in scorer.parameters() if p.requires_grad], cfg.max_grad_norm or float("inf")
        )
        grad_norms.append(float(_full_tensor(grad_norm)))
        optimizer.step()
        scheduler.step()
    keys = sorted(stats)
    sums = parallel.all_sum([v for k in keys for v in stats[k]], world)
    out = {k: sums[2 * i] / max(sums[2 * i + 1], 1e-12) for i, k in enumerate(keys)}
    out["optim/loss"] = sums[2 * keys.index("optim/loss")]  # a sum over micro-batches, not a mean
    out["optim/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    out["optim/advantage_abs_mean"] = float(batch.advantages_B.abs().mean())
    return out


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor; plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[no-any-return]


def _ref_logprobs(
    scorer: torch.nn.Module,
    policy: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    micro: Batch,
    cfg: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """Logprobs under the starting weights: adapters off for LoRA, a frozen copy otherwise."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train_bf16):
        if ref_model is not None:
            return action_logprobs(ref_model, micro, cfg.temperature)[0]
        with policy.disable_adapter():  # type: ignore[operator]
            return score(scorer, micro, cfg.temperature, entropy=False)[0]


def clip_range(cfg: TrainConfig) -> tuple[float, float]:
    """(eps_low, eps_high): ratios are clipped to [1 - eps_low, 1 + eps_high]. Each side is
    ppo_clip unless set; cispo has no lower bound unless ppo_clip_low is set (MiniMax-M1)."""
    default_low = 1.0 if cfg.loss_fn == "cispo" else cfg.ppo_clip
    low = cfg.ppo_clip_low if cfg.ppo_clip_low is not None else default_low
    return low, cfg.ppo_clip_high if cfg.ppo_clip_high is not None else cfg.ppo_clip


def _rewards(group: TrajectoryGroup, cfg: TrainConfig) -> torch.Tensor:
    """The group's rewards as trained on: the env's, plus DAPO's overlong penalty when
    overlong_buffer is set (by the longest turn of each episode)."""
    rewards = group.rewards_G
    if cfg.overlong_buffer:
        longest = [max(len(t.ac.tokens_T) for t in traj.transitions) for traj in group.trajectories_G]
        rewards = [r + overlong_penalty(n, cfg.max_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
                   for r, n in zip(rewards, longest, strict=True)]  # fmt: skip
    return torch.tensor(rewards, dtype=torch.float32)


def _has_spread(group: TrajectoryGroup, cfg: TrainConfig) -> bool:
    return not is_constant(_rewards(group, cfg))


def _datums(groups: list[TrajectoryGroup], cfg: TrainConfig) -> list[Datum]:
    datums: list[Datum] = []
    for group in groups:
        rewards_G = _rewards(group, cfg)
        if cfg.remove_constant_reward_groups and is_constant(rewards_G):
            continue
        advantages_G = group_advantages(rewards_G, cfg.normalize_advantages_by_std)
        for traj, adv in zip(group.trajectories_G, advantages_G.tolist(), strict=True):
            if any(t.metrics.get("drop_trajectory") for t in traj.transitions):
                continue  # the env asked to leave it out of the loss (math_python's drop_void_turns)
            if cfg.overlong_filter and any(t.ac.finish_reason == "length" for t in traj.transitions):
                continue  # DAPO: a truncated answer's reward says little about its tokens (still in the mean)
            datums += trajectory_datums(traj, adv)
    return datums


def _eval_item(index: int, builder: GroupBuilder) -> EvalItem:
    """A test problem for the eval runner: its messages, or (multi-turn envs) how to make its env."""
    problem_id = getattr(builder, "problem_id", "") or str(index)
    if isinstance(builder, SingleTurnBuilder):
        return EvalItem(problem_id, builder.messages, builder.reference, builder.style)
    return EvalItem(problem_id, (), getattr(builder, "reference", ""), make_env=lambda: builder.make_envs(1)[0])


def _sandbox_isolation(options: Any) -> str:
    """What isolates the env's tool sessions here (recorded in config.json)."""
    from mathrl.sandbox.backends import resolve

    return resolve(options.sandbox).isolation()


def _to(batch: Batch, device: torch.device) -> Batch:
    return batch if device.type == "cpu" else batch.to(device)


def _is_adapter(checkpoint: Path) -> bool:
    return (checkpoint / "adapter_config.json").exists()


def _starting_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``load_checkpoint_path`` names, checked against the model and LoRA settings."""
    if not cfg.load_checkpoint_path:
        return None
    from mathrl.checkpoint import resolve_checkpoint
    from mathrl.models import adapter_base, resolve_model_path

    try:
        start = resolve_checkpoint(cfg.load_checkpoint_path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"load_checkpoint_path: {e}") from None
    if not _is_adapter(start):
        return start  # full weights: they are the base
    adapter = json.loads((start / "adapter_config.json").read_text())

    def norm(name: str) -> str:
        name = resolve_model_path(name)
        return str(Path(name).resolve()) if Path(name).exists() else name

    base = adapter_base(start)  # the embedded model for an adapter naming its hub id
    stacked = (Path(base) / "adapter_config.json").exists()  # an adapter over a merged adapter: merge both
    if (cfg.load_checkpoint_mode == "continue" or not stacked) and norm(base) != norm(cfg.model_name):
        raise ConfigError(
            f"load_checkpoint_path: {start} is an adapter on {base}, not on model_name={cfg.model_name}; "
            + ("use load_checkpoint_mode=merge" if stacked else f"pass model_name={base}")
        )
    if cfg.load_checkpoint_mode == "continue":
        rank, alpha = adapter["r"], adapter["lora_alpha"]
        if (cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank) != (rank, alpha):
            raise ConfigError(
                f"load_checkpoint_mode=continue: the checkpoint's adapter has rank {rank} and alpha {alpha}; "
                f"pass lora_rank={rank} lora_alpha={alpha} (or load_checkpoint_mode=merge)"
            )
        if cfg.kl_penalty_coef:
            raise ConfigError(
                "kl_penalty_coef with load_checkpoint_mode=continue would penalise the distance to the model "
                "before the checkpoint (the adapter disabled); use load_checkpoint_mode=merge"
            )
    return start


def _load_base(cfg: TrainConfig, start: Path | None, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The weights training starts from, before new adapters: the model, or the checkpoint's
    full weights, or the model with the checkpoint's adapter merged in (merge mode)."""
    from mathrl.models import load_merged

    if start is None or (_is_adapter(start) and cfg.load_checkpoint_mode == "continue"):
        return load_model(cfg.model_name, dtype)
    return load_merged(str(start), dtype)


def _step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed per (run seed, step, purpose): a resumed step samples what the original would."""
    return (seed * 1_000_003 + step * 7919 + {"train": 1, "eval": 2}[purpose]) % (2**63)


def _save_rollouts(log_path: Path, step: int, groups: list[TrajectoryGroup], tokenizer: Any, cfg: TrainConfig) -> None:
    """Every turn of the step's episodes: prompt, completion, reward, the advantage it was trained
    with (None: its group had no reward spread and was dropped), and the env's logs (the
    extracted answer and the reference; tool calls)."""
    folder = log_path / "rollouts"
    folder.mkdir(exist_ok=True)
    rows = []
    for g, group in enumerate(groups):
        rewards_G = _rewards(group, cfg)
        dropped = cfg.remove_constant_reward_groups and is_constant(rewards_G)
        advantages = (
            [None] * len(rewards_G)
            if dropped
            else group_advantages(rewards_G, cfg.normalize_advantages_by_std).tolist()
        )
        for traj, advantage in zip(group.trajectories_G, advantages, strict=True):
            for turn, tr in enumerate(traj.transitions):
                rows.append({
                    "group": g, "turn": turn, "reward": tr.reward, "total_reward": traj.total_reward,
                    "advantage": advantage,
                    "prompt": tokenizer.decode(tr.ob_tokens_T), "completion": tr.ac_text,
                    "finish_reason": tr.ac.finish_reason, **tr.metrics, **tr.logs,
                })  # fmt: skip
    write_jsonl(folder / f"step_{step:06d}.jsonl", rows)


def _bar_summary(m: dict[str, float]) -> str:
    return f"reward {m.get('env/all/reward/total', math.nan):.3f} correct {m.get('env/all/correct', math.nan):.3f}"


def _warn_truncation(rows: list[dict[str, Any]]) -> None:
    """Reward stuck at 0 because max_tokens cuts answers short is a classic (tinker #180)."""
    recent = [r["env/all/frac_truncated"] for r in rows[-5:] if "env/all/frac_truncated" in r]
    if recent and sum(recent) / len(recent) > 0.5:
        print(f"warning: {sum(recent) / len(recent):.0%} of recent completions hit max_tokens; consider raising it")
