"""``mathrl export``: a run or checkpoint as a model directory other tools load without mathrl.

``merge=true`` (default): the checkpoint's LoRA adapter merged into its base by peft's
``merge_and_unload`` (in fp32, down a chain of stacked adapters: :func:`mathrl.models.load_merged`),
then written by transformers' ``save_pretrained`` with the tokenizer and its chat template:
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``vllm serve DIR`` load it. A full-weights
checkpoint is written the same way (in ``dtype``).

``merge=false``: the adapter alone (adapter_config.json, adapter_model.safetensors, tokenizer),
naming as its base the hub id where there is one (the embedded model's is
``HuggingFaceTB/SmolLM2-135M-Instruct``), so ``PeftModel.from_pretrained`` resolves it on
another machine. A base that is a local directory stays one, with a warning.

The output is written under a temporary name beside it and renamed at the end: a failure
leaves nothing behind (nor the parent directories this created).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mathrl.checkpoint import resolve_checkpoint
from mathrl.config import ConfigError
from mathrl.export.config import ExportConfig as ExportConfig  # re-exported
from mathrl.models import BASE_FILE, adapter_base, load_merged, public_model_name, resolve_model_path
from mathrl.tracking import atomic_write_text

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_export(cfg: ExportConfig) -> Path:
    """Write the export of ``cfg.model`` to ``cfg.output``; return the output directory.
    Every refusal (ConfigError) comes before anything is loaded or written."""
    checkpoint = _checkpoint(cfg.model)
    adapter = (checkpoint / "adapter_config.json").exists()
    if not cfg.merge and not adapter:
        raise ConfigError(
            f"merge=false: {checkpoint} holds full weights, not a LoRA adapter; export it with merge=true"
        )
    output = Path(cfg.output).expanduser()
    _check_output(output, checkpoint, cfg.overwrite)
    with _staging(output) as tmp:
        if cfg.merge:
            dtype = _write_merged(checkpoint, tmp, cfg.dtype)
            what = f"the merged model ({str(dtype).removeprefix('torch.')})"
            use = f"AutoModelForCausalLM.from_pretrained or `vllm serve {output}`"
        else:
            base = _write_adapter(checkpoint, tmp)
            what, use = f"the LoRA adapter (base: {base})", "PeftModel.from_pretrained(base model, DIR)"
    print(f"exported {what} of {checkpoint} to {output}; load it with {use}")
    return output


def _checkpoint(model: str) -> Path:
    """The checkpoint ``model`` names: a run's latest one, or the checkpoint directory itself."""
    try:
        return resolve_checkpoint(Path(model).expanduser())
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def _check_output(output: Path, checkpoint: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output: {output} is a file, not a directory; choose another output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(
            f"output: {output} exists and is not empty; pass overwrite=true to replace it, or choose another"
        )
    if output.resolve() == checkpoint or output.resolve() in checkpoint.parents:
        raise ConfigError(f"output: {output} holds the model being exported; choose another directory")


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A temporary directory beside ``output`` that becomes ``output`` when the block succeeds, and
    is removed, with any parent directory created for it, when it fails."""
    missing = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        _remove(missing[-1:])
        raise ConfigError(f"output: cannot create {output} ({e.strerror or e}); choose a writable directory") from None
    try:
        yield tmp
        old = output.with_name(f".{output.name}.old{os.getpid()}")
        if output.exists():  # empty, or overwrite=true: moved aside, then the new one moved in
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        _remove([tmp, *missing[-1:]])
        if "No space left on device" in str(e) and not isinstance(e, OSError):  # safetensors' own error type
            raise OSError(errno.ENOSPC, "No space left on device", str(output)) from e
        raise


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _reading(checkpoint: Path) -> Iterator[None]:
    """What stops loading (a truncated safetensors or JSON file, a missing file, a base on the hub
    that cannot be fetched) is one line naming the checkpoint and the reason."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model: cannot load {checkpoint}: {reason}") from None


def stored_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype the weights under ``checkpoint`` are stored in: its own config's, or (an adapter)
    its base model's, down a chain of stacked adapters; fp32 where the config names none."""
    from transformers import AutoConfig

    model = str(checkpoint)
    while (Path(model) / "adapter_config.json").exists():
        model = adapter_base(model)
    dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _write_merged(checkpoint: Path, folder: Path, dtype_name: str) -> torch.dtype:
    """The merged model in ``dtype_name`` (auto: the base's); returns the dtype written."""
    from transformers import AutoTokenizer

    with _reading(checkpoint):
        dtype = _DTYPES.get(dtype_name) or stored_dtype(checkpoint)
        model = load_merged(str(checkpoint), torch.float32)  # peft's merge_and_unload, in fp32
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model.config.use_cache = True  # mathrl's loader turns the KV cache off for training; generation wants it
    model.to(dtype).save_pretrained(folder)  # type: ignore[arg-type]  # config, generation_config, safetensors
    tokenizer.save_pretrained(folder)  # with chat_template.jinja
    return dtype


def _write_adapter(checkpoint: Path, folder: Path) -> str:
    """The adapter with the public name of its base; returns that name."""
    from peft import PeftConfig
    from transformers import AutoTokenizer

    with _reading(checkpoint):
        base = adapter_base(checkpoint)
        config = PeftConfig.from_pretrained(str(checkpoint))
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    public = public_model_name(base)
    if Path(public).expanduser().is_absolute() or Path(public).exists():
        stacked = (Path(public) / "adapter_config.json").exists()
        why = (
            f"adapter checkpoint {public} (RL over merged SFT weights), which other tools cannot load as a base; "
            "export with merge=true for a model that stands alone"
            if stacked
            else f"directory {public}: PeftModel.from_pretrained finds it only where that path exists"
        )
        print(f"mathrl export: warning: the adapter's base is the local {why}", file=sys.stderr)
    config.base_model_name_or_path = public
    config.save_pretrained(str(folder))
    shutil.copy2(checkpoint / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    if public != base:  # mathrl itself keeps loading the adapter onto the embedded model's local copy
        atomic_write_text(folder / BASE_FILE, json.dumps({"model_name": base}) + "\n")
    tokenizer.save_pretrained(folder)
    return public
