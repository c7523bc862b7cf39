"""Data-parallel training on torch.distributed: who this process is, the wrapped model, sums over ranks.

``torchrun --standalone --nproc_per_node N -m mathrl train ...`` starts N processes; each reads
its rank from the environment torchrun sets. Gloo on the CPU, NCCL on GPUs. Every rank holds
the policy wrapped in DDP (``parallel=ddp``: replicated weights, gradients all-reduced) or FSDP2
(``parallel=fsdp``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer and the root:
weights, gradients and optimizer state sharded). The trainer shards each (micro-)batch's
sequences over the ranks (:func:`shard`) and scales the loss so the reduced gradient is the sum
of per-sequence terms with globally computed weights: the update equals one process's on the
same global batch. Rank 0 alone generates, logs and writes checkpoints.

A rank that dies: torchrun's agent sees the exit and stops the other ranks with SIGTERM (no hang
in a collective), and the job exits non-zero with the failed rank named. Each surviving rank ends
with one line: it either saw its collective fail first (:func:`lost_a_rank`) or was stopped
(:class:`RankStopped`), whichever came first. The collectives also time out after
``MATHRL_DIST_TIMEOUT_S`` (default 600 s) if the agent cannot act.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (size 1: no torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


class RankStopped(RuntimeError):
    """This rank got SIGTERM: under torchrun, the agent stopping the job because another rank failed."""


def _stop(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second SIGTERM must not interrupt the unwinding
    raise RankStopped(f"stopped by signal {signal.Signals(signum).name}")


def lost_a_rank(error: BaseException) -> bool:
    """This rank ended because another one went away: stopped by the agent, or a collective failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(error)
    return isinstance(error, RankStopped) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL", "timed out")
    )


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (a no-op without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    signal.signal(signal.SIGTERM, _stop)  # unwinds (files are written atomically) to one line in the CLI
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("MATHRL_DIST_TIMEOUT_S", "600")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return World(rank, size, local_rank)


def device_for(world: World, requested: str | None) -> torch.device:
    """The device this rank trains on: ``cuda:<local_rank>`` under torchrun on GPUs."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def wrap(module: torch.nn.Module, parallel: str, world: World, device: torch.device) -> torch.nn.Module:
    """``module`` ready for data-parallel training: as is on one rank, else DDP or FSDP2."""
    if not world.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from mathrl.models import base_of

        for layer in base_of(module).model.layers:  # type: ignore[union-attr]
            fully_shard(layer)
        fully_shard(module)
        return module
    raise ValueError(f"parallel: expected ddp or fsdp, got {parallel!r}")


@contextmanager
def full_weights(module: torch.nn.Module) -> Iterator[None]:
    """Inside, FSDP2-sharded parameters are whole on every rank (a collective: every rank
    enters); DDP and single-process models are whole already."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in reversed(sharded):
            m.reshard()


def no_sync(module: torch.nn.Module, last: bool) -> Any:
    """Gradient accumulation: reduce gradients across ranks only on the ``last`` backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(last)
    return nullcontext()


def shard(n: int, world: World) -> tuple[list[int], bool]:
    """The rows of an ``n``-row micro-batch this rank computes: every ``size``-th from its rank.
    A rank left without a row takes row 0 with its loss weight zeroed (``False``): every rank
    must run the same forwards and backwards, FSDP2's gathers and DDP's reductions are collectives."""
    rows = list(range(world.rank, n, world.size))
    return (rows, True) if rows else ([0], False)


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sums over ranks (identity on one rank)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (pickled: for small control data, e.g. sampled groups)."""
    if not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
