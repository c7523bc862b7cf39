"""What every trainer does around its steps (``mathrl train`` and ``mathrl sft`` share it).

- the run directory: a reused ``log_path`` resumes, refused when the saved config differs in
  what it computes; config.json records what ran;
- the data-parallel world (:mod:`mathrl.parallel`) and the device; seeding;
- the policy: base weights, LoRA, the checkpoint's weights, wrapped for the world;
- AdamW and its learning-rate schedule (:func:`lr_multiplier`);
- checkpoints: written by rank 0 (FSDP2: gathered first, each rank's optimizer shard beside
  them) and read back by every rank on resume.
Rank 0 alone writes anything; the other ranks compute.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mathrl import parallel
from mathrl.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint, set_rng_state
from mathrl.config import ConfigError, config_from_dict, config_to_dict, diff_configs
from mathrl.parallel import World
from mathrl.tracking import TRACKER_KEYS, MetricsLogger, atomic_write_text, check_trackers, keep_rows, open_trackers

C = TypeVar("C")


@dataclass
class Run:
    """A started run: its (resolved) config, directory, world, device and the checkpoint to resume."""

    cfg: Any
    log_path: Path
    world: World
    device: torch.device
    checkpoint: Path | None

    def logger(self, start_step: int) -> MetricsLogger | None:
        """metrics.jsonl and the trackers the config turns on (rank 0), with rows after the resumed
        checkpoint dropped: they are redone. The trainer is decorated with ``closes_trackers``."""
        if not self.world.main:
            return None
        logger = MetricsLogger(self.log_path, open_trackers(self.cfg, self.log_path, start_step))
        keep_rows(logger.path, lambda r: r["step"] < start_step)
        keep_rows(self.log_path / "checkpoints.jsonl", lambda r: r["step"] <= start_step)
        return logger


def start_run(
    cfg: C, default_dir: str, resumable: Collection[str], recorded: dict[str, Any] | None = None
) -> tuple[C, Run]:
    """Resolve ``log_path``, join the world, check a resumed run's config, write config.json
    (with ``recorded``: what was resolved at start), set threads and seeds."""
    check_trackers(cfg)  # a missing package is said before anything is created
    log_path = Path(getattr(cfg, "log_path", None) or default_dir)
    cfg = replace(cfg, log_path=str(log_path))  # type: ignore[type-var]
    device_name: str | None = getattr(cfg, "device", None)
    world = parallel.init_world(torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu")).type)
    device = parallel.device_for(world, device_name)
    if world.main:
        try:
            log_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"log_path: cannot create {log_path} ({e.strerror}); pass a directory you can write"
            ) from None
    checkpoint = check_resume(cfg, log_path, resumable, ignore=tuple(recorded or ()))
    if world.main:
        record = {**config_to_dict(cfg), **(recorded or {})}
        atomic_write_text(log_path / "config.json", json.dumps(record, indent=2) + "\n")
    parallel.barrier(world)
    if getattr(cfg, "num_threads", None):
        torch.set_num_threads(cfg.num_threads)  # type: ignore[attr-defined]
    seed_everything(cfg.seed)  # type: ignore[attr-defined]
    return cfg, Run(cfg, log_path, world, device, checkpoint)


def check_resume(cfg: Any, log_path: Path, resumable: Collection[str], ignore: Collection[str] = ()) -> Path | None:
    """The checkpoint to resume from; refuse when the saved config differs in what it computes.
    ``ignore``: keys config.json records beside the config (resolved at start, not options)."""
    saved_file = log_path / "config.json"
    if saved_file.exists():
        recorded = {k: v for k, v in json.loads(saved_file.read_text()).items() if k not in ignore}
        saved = config_to_dict(config_from_dict(type(cfg), recorded, str(saved_file)))
        changed = [k for k in diff_configs(saved, config_to_dict(cfg)) if k not in {*resumable, *TRACKER_KEYS}]
        if changed:
            raise ConfigError(
                f"log_path {log_path} holds a run with a different config ({', '.join(changed)}); "
                "use a new log_path to start a new run"
            )
    return latest_checkpoint(log_path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the peak learning rate at ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps (``(step+1)/warmup``), then constant, linear or cosine decay
    that would reach 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule: unknown schedule {schedule!r}")


def make_policy(
    load_base: Callable[[torch.dtype], torch.nn.Module],
    *,
    lora_rank: int,
    lora_alpha: int | None,
    train_bf16: bool,
    parallel_mode: str,
    world: World,
    seed: int,
    gradient_checkpointing: bool = False,
) -> tuple[torch.nn.Module, bool]:
    """The trainable policy (not yet wrapped for the world) and whether its frozen base is bf16.

    With LoRA under bf16 autocast the frozen base is only ever used in bf16: it is stored so
    (autocast would cast every fp32 weight at every use). Not under FSDP2, whose shards of one
    layer must share a dtype (the adapters are fp32)."""
    from mathrl.models import wrap_lora

    frozen_bf16 = bool(lora_rank) and train_bf16 and not (world.distributed and parallel_mode == "fsdp")
    base_model = load_base(torch.bfloat16 if frozen_bf16 else torch.float32)
    if gradient_checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    torch.manual_seed(seed)  # LoRA init draws random numbers: seed first (TRL #6688)
    return wrap_lora(base_model, lora_rank, lora_alpha, autocast=frozen_bf16), frozen_bf16  # type: ignore[arg-type]


def make_optimizer(
    policy: torch.nn.Module, cfg: Any, total_steps: int, warmup_steps: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.95) on the trainable parameters and the schedule of ``cfg.lr_schedule``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_multiplier(i, total_steps, warmup_steps, cfg.lr_schedule)
    )
    return optimizer, scheduler


def _optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank:03d}.pt"


def restore_weights(run: Run, policy: torch.nn.Module, lora_rank: int) -> int:
    """Load the resumed checkpoint's trained weights and RNG state (before wrapping the policy);
    return the step to continue from (0 for a new run)."""
    if run.checkpoint is None:
        return 0
    load_weights(policy, run.checkpoint, lora_rank)
    state = load_trainer_state(run.checkpoint)
    set_rng_state(state["rng"])
    return int(state["step"])


def restore_optimizer(
    run: Run,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    updates_per_step: int = 1,
) -> None:
    """The optimizer state and schedule of the resumed checkpoint (after wrapping: FSDP2's
    optimizer state is per shard, saved per rank)."""
    if run.checkpoint is None:
        return
    state = load_trainer_state(run.checkpoint)
    sharded = run.checkpoint / _optimizer_file(run.world.rank)
    if sharded.exists():
        if int(state.get("world_size", 1)) != run.world.size:
            raise ConfigError(
                f"{run.checkpoint} was saved by {state.get('world_size')} FSDP ranks; resume it with as many"
            )
        optimizer.load_state_dict(torch.load(sharded, weights_only=False))
    else:
        optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    else:  # written before schedules were saved: the schedule is a function of the update count
        for _ in range(int(state["step"]) * updates_per_step):
            scheduler.step()


def save(
    run: Run,
    step: int,
    policy: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    final: bool = False,
) -> None:
    """Checkpoint ``step`` (every rank calls this). DDP and one process: rank 0 writes the
    weights and the optimizer (the same on every rank). FSDP2: the weights are gathered and
    written by rank 0, each rank writes its optimizer shard into the checkpoint's temporary
    directory first; rank 0 renames it into place last, so a listed checkpoint is complete."""
    from torch.distributed.fsdp import FSDPModule

    from mathrl.models import unwrap

    sharded = any(isinstance(m, FSDPModule) for m in policy.modules())
    tmp = run.log_path / "checkpoints" / f"step_{step:06d}.tmp"
    state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "world_size": run.world.size}
    if sharded:
        if run.world.main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        parallel.barrier(run.world)
        torch.save(optimizer.state_dict(), tmp / _optimizer_file(run.world.rank))
        parallel.barrier(run.world)
    else:
        state["optimizer"] = optimizer.state_dict()
    with parallel.full_weights(policy):
        if run.world.main:
            save_checkpoint(run.log_path, step, unwrap(policy), tokenizer, state, final=final, keep_tmp=sharded)
    parallel.barrier(run.world)
