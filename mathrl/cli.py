"""The ``mathrl`` command: ``mathrl <subcommand> key=value ... [config=FILE]``."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from mathrl.config import ConfigError, config_help, parse_config


def _train(argv: Sequence[str]) -> None:
    from transformers.utils import logging as hf_logging

    from mathrl.train.rl import TrainConfig, train

    hf_logging.disable_progress_bar()  # per-tensor loading bars would drown the run's own progress

    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(TrainConfig, "mathrl train"))
        print(_env_help())
        return
    cfg = parse_config(TrainConfig, argv)
    log_path = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(f"run directory: {log_path}")


def _eval(argv: Sequence[str]) -> None:
    from transformers.utils import logging as hf_logging

    from mathrl.eval.command import EvalConfig, run_eval

    hf_logging.disable_progress_bar()
    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(EvalConfig, "mathrl eval"))
        return
    run_eval(parse_config(EvalConfig, argv))


def _sft(argv: Sequence[str]) -> None:
    from transformers.utils import logging as hf_logging

    from mathrl.train.sft import SFTConfig, sft

    hf_logging.disable_progress_bar()
    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(SFTConfig, "mathrl sft"))
        return
    log_path = sft(parse_config(SFTConfig, argv))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(f"run directory: {log_path}")


def _serve(argv: Sequence[str]) -> None:
    from mathrl.serve import ServeConfig, serve

    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(ServeConfig, "mathrl serve"))
        return
    serve(parse_config(ServeConfig, argv))


def _distill(argv: Sequence[str]) -> None:
    from transformers.utils import logging as hf_logging

    from mathrl.train.distill import DistillConfig, run_distill

    hf_logging.disable_progress_bar()
    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(DistillConfig, "mathrl distill"))
        return
    run_distill(parse_config(DistillConfig, argv))


def _traces(argv: Sequence[str]) -> None:
    from mathrl.train.distill import TracesConfig, run_traces

    if any(a in ("-h", "--help", "help") for a in argv):
        print(config_help(TracesConfig, "mathrl traces"))
        return
    run_traces(parse_config(TracesConfig, argv))


def _env_help() -> str:
    from dataclasses import MISSING, fields

    from mathrl.envs.registry import ENVS

    lines = ["\nenvironments (env=NAME; options as env_args.KEY=VALUE):"]
    for name, spec in ENVS.items():
        lines.append(f"  {name}: {spec.description}")
        for f in fields(spec.options):
            default = f.default if f.default is not MISSING else "-"
            lines.append(f"    env_args.{f.name:<14} = {default!s:<8} {f.metadata.get('help', '')}")
    return "\n".join(lines)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "train": (_train, "GRPO reinforcement learning with verifiable rewards"),
    "sft": (_sft, "supervised fine-tuning (LoRA or full) on chat JSONL, loss on assistant tokens"),
    "serve": (_serve, "OpenAI-compatible chat server for a model, checkpoint or run"),
    "eval": (_eval, "benchmarks: pass@1 with 95% CI, pass@k, maj@k; several models -> ablation table"),
    "distill": (_distill, "a teacher answers a dataset; graded-correct replies -> SFT traces + yield report"),
    "traces": (_traces, "combine, dedup, filter and shuffle trace files; dataset solutions -> traces"),
}


def main(argv: Sequence[str] | None = None) -> int:
    # peft calls a transformers method that warns about its own rename; not actionable for users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: mathrl <command> [key=value ...] [config=FILE]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n`mathrl <command> --help` lists every key with its default.")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[args[0]]
    from mathrl.runtime import tune_allocator

    tune_allocator()
    try:
        command(args[1:])
    except RuntimeError as e:
        if not _lost_a_rank(e):
            raise
        print(
            f"mathrl {args[0]}: error: rank {os.environ.get('RANK')} lost contact with another rank, which died or "
            "was killed (torchrun's report names it); rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 1
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # User mistakes end with one line; ValueError subclasses from deeper down are bugs: traceback.
        if isinstance(e, ValueError) and type(e) not in (ValueError, ConfigError):
            raise
        print(f"mathrl {args[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(
            f"mathrl {args[0]}: error: no space left on device writing {e.filename}; free space and rerun the same "
            "command (a run resumes from its last complete checkpoint)",
            file=sys.stderr,
        )
        return 2
    return 0


def _lost_a_rank(error: RuntimeError) -> bool:
    """A collective failed because a peer process went away (under torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL", "timed out"))


if __name__ == "__main__":
    sys.exit(main())
