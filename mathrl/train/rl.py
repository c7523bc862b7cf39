"""GRPO with verifiable rewards, top to bottom in one function: ``train(cfg)``.

Each step: draw ``groups_per_batch`` problems, sample ``group_size`` episodes for each
(one turn, or several with tool calls: token-exact, see :mod:`mathrl.rollout.renderer`),
let the env grade them, advantage = reward - group mean, compute a policy-gradient loss
from a registry on the sampled tokens only, take ``num_substeps`` optimizer steps, log,
checkpoint.

What differs from the GRPO paper, on purpose (as in tinker-cookbook):
- advantages are not divided by the group std unless ``normalize_advantages_by_std``
  (Dr. GRPO's argument), and constant-reward groups are dropped by default;
- the default loss is importance sampling (ratio * A, no clipping); ``loss_fn=ppo`` clips;
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
import random
import resource
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from mathrl.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint, set_rng_state
from mathrl.config import ConfigError, config_from_dict, config_to_dict, diff_configs, option
from mathrl.envs.base import GroupBuilder, SingleTurnBuilder
from mathrl.envs.registry import make_dataset
from mathrl.eval.metrics import summarize, test_metrics
from mathrl.eval.runner import EvalItem, GenSettings, to_results
from mathrl.eval.runner import evaluate as run_eval_items
from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_model, load_tokenizer, sync_weights, wrap_lora
from mathrl.plots import plot_metrics
from mathrl.rl.advantages import group_advantages, is_constant
from mathrl.rl.batching import Batch, Datum, action_logprobs, collate, trajectory_datums
from mathrl.rl.losses import AGGREGATIONS, LOSSES, kl_k3
from mathrl.rollout.backend import LocalBackend, context_length
from mathrl.rollout.metrics import group_metrics
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.runner import run_groups
from mathrl.rollout.sampler import TorchSampler
from mathrl.tools.formats import PARSER_CHOICES
from mathrl.tracking import MetricsLogger, ProgressBar, atomic_write_text, keep_rows, write_jsonl
from mathrl.types import TrajectoryGroup

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of ``mathrl train``; names follow tinker-cookbook."""

    env: str = field(default="arithmetic", metadata=option("Environment name (see the env registry)."))
    env_args: dict[str, Any] = field(
        default_factory=dict, metadata=option("Env options, e.g. env_args.max_operand=20.")
    )
    model_name: str = field(
        default=EMBEDDED_MODEL, metadata=option("HF hub id, local HF directory, or the embedded model.")
    )
    group_size: int = field(default=8, metadata=option("Completions sampled per problem.", min=1))
    groups_per_batch: int = field(default=16, metadata=option("Problems per step.", min=1))
    learning_rate: float = field(default=1e-3, metadata=option("AdamW peak learning rate.", min=0))
    lr_schedule: Literal["constant", "linear"] = field(
        default="linear", metadata=option("Decay to 0 over max_steps, or not.")
    )
    max_tokens: int = field(default=16, metadata=option("Max new tokens per completion.", min=1))
    temperature: float = field(default=1.0, metadata=option("Sampling temperature during training.", min=0))
    lora_rank: int = field(default=32, metadata=option("LoRA rank on all linear layers; 0 = full fine-tuning.", min=0))
    lora_alpha: int | None = field(default=None, metadata=option("LoRA alpha (default: = lora_rank)."))
    loss_fn: Literal["importance_sampling", "ppo"] = field(
        default="importance_sampling", metadata=option("Policy loss.")
    )
    loss_agg: Literal["token_sum", "token_mean", "seq_mean"] = field(
        default="token_mean", metadata=option("How per-token losses are combined.")
    )
    ppo_clip: float = field(default=0.2, metadata=option("Clip range of loss_fn=ppo.", min=0))
    kl_penalty_coef: float = field(default=0.0, metadata=option("k3 KL penalty to the starting weights.", min=0))
    normalize_advantages_by_std: bool = field(default=False, metadata=option("Divide advantages by the group std."))
    remove_constant_reward_groups: bool = field(default=True, metadata=option("Drop groups with no reward spread."))
    num_substeps: int = field(default=1, metadata=option("Optimizer steps per batch (minibatches).", min=1))
    micro_batch_tokens: int = field(
        default=4096, metadata=option("Tokens per forward/backward (memory only; a shared prompt counts once).", min=1)
    )
    max_grad_norm: float = field(default=1.0, metadata=option("Gradient clipping (0 = off).", min=0))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay.", min=0))
    max_steps: int = field(default=30, metadata=option("Training steps.", min=0))
    max_turns: int = field(
        default=10,
        metadata=option("Most turns per episode (an env may end sooner: single-turn envs after one).", min=1),
    )
    tool_parser: str = field(
        default="auto",
        metadata=option("Tool-call format: auto (what the chat template writes, else hermes).", choices=PARSER_CHOICES),
    )
    eval_every: int = field(default=10, metadata=option("Test evaluation every N steps (0 = only at the end).", min=0))
    eval_temperature: float = field(default=0.0, metadata=option("Test sampling temperature (0 = greedy).", min=0))
    eval_n: int = field(default=1, metadata=option("Samples per test problem.", min=1))
    save_every: int = field(default=20, metadata=option("Checkpoint every N steps (0 = only the final one).", min=0))
    log_path: str | None = field(
        default=None, metadata=option("Run directory (default runs/<env>-<time>); reused = resume.")
    )
    seed: int = field(default=0, metadata=option("Seed for data, sampling and LoRA init."))
    train_bf16: bool = field(default=True, metadata=option("bf16 autocast for the training forward/backward."))
    sample_dtype: Literal["bfloat16", "float32"] = field(default="bfloat16", metadata=option("Sampler weights dtype."))
    device: str | None = field(default=None, metadata=option("cpu, cuda, ... (default: cuda if available)."))
    num_threads: int | None = field(default=None, metadata=option("torch CPU threads (default: all cores)."))
    save_rollouts: bool = field(default=True, metadata=option("Write sampled rollouts per step to rollouts/."))
    load_checkpoint_path: str | None = field(
        default=None,
        metadata=option(
            "Start from these weights: a mathrl run (its latest checkpoint, e.g. an SFT run) or a checkpoint "
            "directory; config.json records the checkpoint it resolved to. A log_path with checkpoints of its "
            "own resumes from them (this must still name the same checkpoint)."
        ),
    )
    load_checkpoint_mode: Literal["merge", "continue"] = field(
        default="merge",
        metadata=option(
            "For a LoRA checkpoint: merge it into the base and add new adapters, or keep training the same "
            "adapter (needs the same lora_rank and alpha)."
        ),
    )


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


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) GRPO; return the run directory."""
    log_path = Path(cfg.log_path or f"runs/{cfg.env}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg = replace(cfg, log_path=str(log_path))
    start = _starting_checkpoint(cfg)
    cfg = replace(cfg, load_checkpoint_path=str(start) if start else None)  # config.json: what was loaded
    log_path.mkdir(parents=True, exist_ok=True)
    checkpoint = _check_resume(cfg, log_path)
    dataset, env_options = make_dataset(cfg.env, cfg.env_args, cfg.groups_per_batch, cfg.seed)
    resolved = {"sandbox": _sandbox_isolation(env_options)} if hasattr(env_options, "sandbox") else {}
    atomic_write_text(log_path / "config.json", json.dumps({**config_to_dict(cfg), **resolved}, indent=2) + "\n")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _seed_everything(cfg.seed)

    # --- model, sampler, data -------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model_name)
    renderer = Renderer(tokenizer, cfg.tool_parser)
    # With LoRA the base is frozen and, under bf16 autocast, only ever used in bf16: store it so
    # (autocast would cast every fp32 weight at every use). Adapters stay fp32 (peft's default).
    frozen_bf16 = bool(cfg.lora_rank) and cfg.train_bf16
    base_model = _load_base(cfg, start, torch.bfloat16 if frozen_bf16 else torch.float32)
    ref_model = (
        _load_base(cfg, start).eval().requires_grad_(False) if cfg.kl_penalty_coef and not cfg.lora_rank else None
    )
    torch.manual_seed(cfg.seed)  # LoRA init draws random numbers: seed first (TRL #6688)
    policy = wrap_lora(base_model, cfg.lora_rank, cfg.lora_alpha, autocast=frozen_bf16)
    if start is not None and _is_adapter(start) and cfg.load_checkpoint_mode == "continue":
        load_weights(policy, start, cfg.lora_rank)  # the same adapter keeps training
    elif start is not None and cfg.lora_rank:  # new adapters over the loaded weights: say so for loaders
        policy.peft_config["default"].base_model_name_or_path = str(start)  # type: ignore[index, operator, union-attr]
    if checkpoint is not None:
        load_weights(policy, checkpoint, cfg.lora_rank)
    policy.to(device).train()
    # No requires_grad_(False) here: measured on torch 2.13 CPU, bf16 decoding with frozen
    # parameters ran 5x slower and peaked at 12 GB. inference_mode already skips autograd.
    sampler_model = _load_base(cfg, start, getattr(torch, cfg.sample_dtype))
    sampler_model.to(device)  # type: ignore[arg-type]
    sync_weights(policy, sampler_model)
    sampler = TorchSampler(sampler_model, eos_token_ids(tokenizer), tokenizer.pad_token_id, tokenizer=tokenizer)
    if ref_model is not None:
        ref_model.to(device)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    total_updates = max(cfg.max_steps * cfg.num_substeps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 1.0 if cfg.lr_schedule == "constant" else max(0.0, 1 - i / total_updates)
    )
    start_step = 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
    logger = MetricsLogger(log_path)
    keep_rows(logger.path, lambda r: r["step"] < start_step)  # rows after the checkpoint are redone
    keep_rows(log_path / "checkpoints.jsonl", lambda r: r["step"] <= start_step)

    test_items = [_eval_item(i, b) for i, b in enumerate(dataset.test_builders())]
    eval_backend = LocalBackend(sampler_model, tokenizer, tool_parser=cfg.tool_parser)  # the sampler's weights

    def evaluate(step: int) -> dict[str, float]:
        """Test metrics with mathrl eval's code (pass@1 with its 95% interval, pass@k, maj@k,
        and the tool metrics of multi-turn envs)."""
        t0 = time.time()
        seed = _step_seed(cfg.seed, step, "eval")
        items = test_items
        settings = GenSettings(cfg.eval_n, cfg.max_tokens, cfg.eval_temperature, 1.0, seed, cfg.max_turns)
        episodes = any(item.make_env for item in items)  # tool episodes hold a sandbox session each
        rows = run_eval_items(eval_backend, items, settings, out_path=log_path / "eval" / f"step_{step:06d}.jsonl",
                              chunk_size=64 if episodes else len(items))  # fmt: skip
        return {**test_metrics(summarize("test", to_results(rows))), "time/eval": time.time() - t0}

    def save(step: int, final: bool = False) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        save_checkpoint(log_path, step, policy, tokenizer, state, final=final)

    bar = ProgressBar("train", cfg.max_steps, start_step, progress, "test/env/all/correct", "test correct",
                      _bar_summary, digits=3)  # fmt: skip
    run_start = time.time()
    # --- the loop -------------------------------------------------------------------------
    for step in range(start_step, cfg.max_steps):
        t_step = time.time()
        metrics: dict[str, float] = {}
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics |= evaluate(step)

        # 1. sample group_size completions for each problem, graded by the env
        t0 = time.time()
        groups = run_groups(
            dataset.get_batch(step), cfg.group_size, sampler, renderer,
            max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=_step_seed(cfg.seed, step, "train"),
            max_turns=cfg.max_turns, max_context=context_length(sampler_model),
        )  # fmt: skip
        metrics |= group_metrics(groups)
        metrics["time/sample"] = time.time() - t0

        # 2. advantages within each group -> training sequences
        datums = _datums(groups, cfg)
        metrics["optim/num_sequences"] = len(datums)

        # 3. policy-gradient update(s), then refresh the sampler's weights
        t0 = time.time()
        if datums:
            metrics |= _update(
                policy, ref_model, optimizer, scheduler, collate(datums, tokenizer.pad_token_id), cfg, device
            )
            sync_weights(policy, sampler_model)
        else:
            for _ in range(cfg.num_substeps):
                scheduler.step()
        metrics["time/train"] = time.time() - t0

        # 4. log, keep rollouts, checkpoint
        if cfg.save_rollouts:
            _save_rollouts(log_path, step, groups, tokenizer)
        metrics |= {"progress/batch": step, "optim/lr": float(scheduler.get_last_lr()[0])}
        metrics["time/step"] = time.time() - t_step
        metrics["time/total"] = time.time() - run_start
        metrics["mem/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        logger.log(step, metrics)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            save(step + 1)
        bar.update(step, metrics)
        if "test/env/all/correct" in metrics:
            plot_metrics(logger.rows(), log_path / "plot.png", title=f"{cfg.env} | {cfg.model_name}")

    # --- the end: final checkpoint, then evaluate exactly those weights --------------------
    if start_step < cfg.max_steps or latest_checkpoint(log_path) is None:
        save(cfg.max_steps, final=True)
    final = evaluate(cfg.max_steps)
    logger.log(cfg.max_steps, {**final, "time/total": time.time() - run_start})
    plot_metrics(logger.rows(), log_path / "plot.png", title=f"{cfg.env} | {cfg.model_name}")
    bar.close(final)
    _warn_truncation(logger.rows())
    return log_path


def _update(
    policy: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: Batch,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """``num_substeps`` optimizer steps over consecutive minibatches of ``batch``."""
    stats: dict[str, list[float]] = {}

    def add(key: str, value: float, weight: float = 1.0) -> None:
        stats.setdefault(key, []).extend([value * weight, weight])

    bounds = np.linspace(0, len(batch), cfg.num_substeps + 1).round().astype(int)
    for sub, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi <= lo:
            continue
        minibatch = batch.slice(lo, hi)
        weights_BT = AGGREGATIONS[cfg.loss_agg](minibatch.action_mask_BT)
        optimizer.zero_grad(set_to_none=True)
        for m, m_end in minibatch.micro_batches(cfg.micro_batch_tokens):
            micro = _to(minibatch.slice(m, m_end), device)
            w_BT = weights_BT[m:m_end, : micro.input_ids_BT.shape[1]].to(device)
            mask_BT = micro.action_mask_BT
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train_bf16):
                logp_BT, entropy_BT = action_logprobs(policy, micro, cfg.temperature)
            loss_BT = LOSSES[cfg.loss_fn](logp_BT, micro.sample_logprobs_BT, micro.advantages_B, cfg.ppo_clip)
            if cfg.kl_penalty_coef:
                ref_logp_BT = _ref_logprobs(policy, ref_model, micro, cfg, device)
                kl_BT = kl_k3(logp_BT, ref_logp_BT)
                loss_BT = loss_BT + cfg.kl_penalty_coef * kl_BT
                add("optim/kl_ref", float((kl_BT * mask_BT).sum() / mask_BT.sum()), float(mask_BT.sum()))
            loss = (loss_BT * w_BT).sum()
            loss.backward()
            n_tok = float(mask_BT.sum())
            diff_BT = (micro.sample_logprobs_BT - logp_BT.detach()) * mask_BT
            ratio_BT = torch.exp(-diff_BT)
            if sub == 0:  # before any update: pure sampler/trainer mismatch
                add("optim/kl_sample_train_v1", float(diff_BT.sum()) / n_tok, n_tok)
                add("optim/kl_sample_train_v2", float(0.5 * (diff_BT**2).sum()) / n_tok, n_tok)
            add("optim/entropy", float((entropy_BT * mask_BT).sum()) / n_tok, n_tok)
            add("optim/ratio_mean", float((ratio_BT * mask_BT).sum()) / n_tok, n_tok)
            clipped = ((ratio_BT - 1).abs() > cfg.ppo_clip).float() * mask_BT
            add("optim/frac_ratio_outside_clip", float(clipped.sum()) / n_tok, n_tok)
            add("optim/loss", float(loss.detach()), 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm or float("inf")
        )
        add("optim/grad_norm", float(grad_norm))
        optimizer.step()
        scheduler.step()
    out = {k: sum(v[0::2]) / max(sum(v[1::2]), 1e-12) for k, v in stats.items()}
    out["optim/loss"] = sum(stats["optim/loss"][0::2])  # a sum over micro-batches, not a mean
    out["optim/advantage_abs_mean"] = float(batch.advantages_B.abs().mean())
    return out


def _ref_logprobs(
    policy: torch.nn.Module, ref_model: torch.nn.Module | None, micro: Batch, cfg: TrainConfig, device: torch.device
) -> torch.Tensor:
    """Logprobs under the starting weights: adapters off for LoRA, a frozen copy otherwise."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train_bf16):
        if ref_model is not None:
            return action_logprobs(ref_model, micro, cfg.temperature)[0]
        with policy.disable_adapter():  # type: ignore[operator]
            return action_logprobs(policy, micro, cfg.temperature)[0]


def _datums(groups: list[TrajectoryGroup], cfg: TrainConfig) -> list[Datum]:
    datums: list[Datum] = []
    for group in groups:
        rewards_G = torch.tensor(group.rewards_G, dtype=torch.float32)
        if cfg.remove_constant_reward_groups and is_constant(rewards_G):
            continue
        advantages_G = group_advantages(rewards_G, cfg.normalize_advantages_by_std)
        for traj, adv in zip(group.trajectories_G, advantages_G.tolist(), strict=True):
            if any(t.metrics.get("drop_trajectory") for t in traj.transitions):
                continue  # the env asked to leave it out of the loss (math_python's drop_void_turns)
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
    from mathrl.models import resolve_model_path

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

    base = adapter["base_model_name_or_path"]
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


def _check_resume(cfg: TrainConfig, log_path: Path) -> Path | None:
    """The checkpoint to resume from; refuse when the saved config differs in what it computes."""
    saved_file = log_path / "config.json"
    checkpoint = latest_checkpoint(log_path)
    if saved_file.exists():
        recorded = json.loads(saved_file.read_text())
        recorded.pop("sandbox", None)  # what was resolved at start (the sandbox's isolation), not a key
        saved = config_to_dict(config_from_dict(TrainConfig, recorded, str(saved_file)))
        changed = [k for k in diff_configs(saved, config_to_dict(cfg)) if k not in _RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(
                f"log_path {log_path} holds a run with a different config ({', '.join(changed)}); "
                "use a new log_path to start a new run"
            )
    return checkpoint


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed per (run seed, step, purpose): a resumed step samples what the original would."""
    return (seed * 1_000_003 + step * 7919 + {"train": 1, "eval": 2}[purpose]) % (2**63)


def _save_rollouts(log_path: Path, step: int, groups: list[TrajectoryGroup], tokenizer: Any) -> None:
    folder = log_path / "rollouts"
    folder.mkdir(exist_ok=True)
    rows = []
    for g, group in enumerate(groups):
        for traj in group.trajectories_G:
            for turn, tr in enumerate(traj.transitions):
                rows.append({
                    "group": g, "turn": turn, "reward": tr.reward, "total_reward": traj.total_reward,
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
