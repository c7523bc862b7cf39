"""Save and restore everything a run needs to continue exactly where it stopped.

A checkpoint directory holds the weights in HF format (a peft adapter for LoRA runs,
a full ``save_pretrained`` model otherwise, plus the tokenizer) so any tool can load
it, and ``trainer_state.pt``: the next step, optimizer and scheduler state and the
RNG states. It is written under a temporary name and renamed, and only then listed in
checkpoints.jsonl, so the last listed checkpoint is always complete.
"""

from __future__ import annotations

import errno
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mathrl.tracking import append_jsonl, read_jsonl

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    log_path: Path,
    step: int,
    policy: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    final: bool = False,
    keep_tmp: bool = False,
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically and list it in checkpoints.jsonl.
    ``keep_tmp``: the temporary directory already holds files of this checkpoint (FSDP2's
    per-rank optimizer shards); the weights are then read from the (gathered) parameters."""
    target = log_path / "checkpoints" / f"step_{step:06d}"
    tmp = target.with_name(target.name + ".tmp")
    try:
        _write(target, tmp, policy, tokenizer, trainer_state, step, keep_tmp)
    except BaseException as e:  # a full disk, a kill: no half-written checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if "No space left on device" in str(e) and not isinstance(e, OSError):  # safetensors' own error type
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from e
        raise
    append_jsonl(
        log_path / "checkpoints.jsonl", {"step": step, "path": str(target.relative_to(log_path)), "final": final}
    )
    return target


def _write(
    target: Path, tmp: Path, policy: torch.nn.Module, tokenizer: Any, trainer_state: dict[str, Any], step: int,
    keep_tmp: bool,
) -> None:  # fmt: skip
    if not keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    # Parameters as registered now: under FSDP2's unshard they are whole, where state_dict()
    # would return the shards.
    state = {n: p.detach() for n, p in policy.named_parameters()} if keep_tmp else None
    with warnings.catch_warnings():  # peft looks for a config.json at an adapter's base: absent when that
        warnings.filterwarnings("ignore", message="Could not find a config file")  # base is an SFT adapter
        policy.save_pretrained(tmp, state_dict=state)  # type: ignore[operator]
    if (tmp / "adapter_config.json").exists():
        from mathrl.models import publish_adapter_base

        publish_adapter_base(tmp)  # the embedded model's hub id as base, not this machine's cache path
    tokenizer.save_pretrained(tmp)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def latest_checkpoint(log_path: Path) -> Path | None:
    """The last complete checkpoint listed in checkpoints.jsonl, if any."""
    for row in reversed(read_jsonl(log_path / "checkpoints.jsonl")):
        path = Path(row["path"])
        if not path.is_absolute():
            path = log_path / path
        if (path / STATE_FILE).exists():
            return path
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, weights_only=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A mathrl run directory -> its latest checkpoint (absolute); a checkpoint or any HF
    model directory -> itself (absolute). Errors say which one was expected."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (expected a mathrl run or checkpoint directory)")
    if (p / "checkpoints.jsonl").exists() or (p / "metrics.jsonl").exists():
        latest = latest_checkpoint(p)
        if latest is None:
            raise ValueError(f"{path}: the run has no finished checkpoint yet")
        return latest.resolve()
    if not ((p / "adapter_config.json").exists() or (p / "config.json").exists()):
        raise ValueError(f"{path}: neither a mathrl run nor a checkpoint (no adapter_config.json or config.json)")
    return p.resolve()


def load_weights(policy: torch.nn.Module, checkpoint: Path, lora_rank: int) -> None:
    """Load a checkpoint's trained weights into ``policy``: the LoRA adapter, or the full weights."""
    from safetensors.torch import load_file

    if lora_rank:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(checkpoint / "adapter_model.safetensors"))
    else:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            state |= load_file(f)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"{checkpoint}: checkpoint does not match the model ({missing[:3]}, {unexpected[:3]})")
