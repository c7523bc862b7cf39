"""The ``mathrl`` command: ``mathrl <subcommand> key=value ... [config=FILE]``."""

from __future__ import annotations

import difflib
import errno
import os
import shutil
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence

from mathrl.config import ConfigError, config_help, parse_config


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "help") for a in argv)


def _quiet_hub() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars would drown the run's own progress


def _say_run_directory(log_path: object) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(f"run directory: {log_path}")


# Each command reads its options from a module that does not import torch, so --help is instant;
# the code that runs it is imported only to run.


def _train(argv: Sequence[str]) -> None:
    from mathrl.train.configs import TrainConfig

    if _wants_help(argv):
        print(config_help(TrainConfig, "mathrl train"))
        print(_env_help())
        return
    cfg = parse_config(TrainConfig, argv)
    _quiet_hub()
    from mathrl.train.rl import train

    _say_run_directory(train(cfg))


def _eval(argv: Sequence[str]) -> None:
    from mathrl.eval.config import EvalConfig

    if _wants_help(argv):
        print(config_help(EvalConfig, "mathrl eval"))
        return
    cfg = parse_config(EvalConfig, argv)
    _quiet_hub()
    from mathrl.eval.command import run_eval

    run_eval(cfg)


def _sft(argv: Sequence[str]) -> None:
    from mathrl.train.configs import SFTConfig

    if _wants_help(argv):
        print(config_help(SFTConfig, "mathrl sft"))
        return
    cfg = parse_config(SFTConfig, argv)
    _quiet_hub()
    from mathrl.train.sft import sft

    _say_run_directory(sft(cfg))


def _serve(argv: Sequence[str]) -> None:
    from mathrl.serve import ServeConfig, serve

    if _wants_help(argv):
        print(config_help(ServeConfig, "mathrl serve"))
        return
    serve(parse_config(ServeConfig, argv))


def _distill(argv: Sequence[str]) -> None:
    from mathrl.train.configs import DistillConfig

    if _wants_help(argv):
        print(config_help(DistillConfig, "mathrl distill"))
        return
    cfg = parse_config(DistillConfig, argv)
    _quiet_hub()
    from mathrl.train.distill import run_distill

    run_distill(cfg)


def _traces(argv: Sequence[str]) -> None:
    from mathrl.train.configs import TracesConfig

    if _wants_help(argv):
        print(config_help(TracesConfig, "mathrl traces"))
        return
    cfg = parse_config(TracesConfig, argv)
    from mathrl.train.distill import run_traces

    run_traces(cfg)


def _export(argv: Sequence[str]) -> None:
    from mathrl.export.config import ExportConfig

    if _wants_help(argv):
        print(config_help(ExportConfig, "mathrl export"))
        return
    cfg = parse_config(ExportConfig, argv)
    _quiet_hub()
    from mathrl.export.command import run_export

    run_export(cfg)


def _report(argv: Sequence[str]) -> None:
    from mathrl.report.config import ReportConfig

    if _wants_help(argv):
        print(config_help(ReportConfig, "mathrl report"))
        return
    from mathrl.report import run_report

    run_report(parse_config(ReportConfig, argv))


def _env_help() -> str:
    from dataclasses import MISSING, fields

    from mathrl.envs.registry import ENVS

    width = max(shutil.get_terminal_size((100, 24)).columns, 40)
    lines = ["\nenvironments (env=NAME; options as env_args.KEY=VALUE):"]
    for name, spec in ENVS.items():
        lines.append(f"  {name}: {spec.description}")
        for f in fields(spec.options):
            default = f.default if f.default is not MISSING else "-"
            lines += textwrap.wrap(f"env_args.{f.name} = {default!s}", width - 1, initial_indent=" " * 4,
                                   subsequent_indent=" " * 8)  # fmt: skip
            lines += textwrap.wrap(f.metadata.get("help", ""), width - 1, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8)  # fmt: skip
    return "\n".join(lines)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "train": (_train, "GRPO reinforcement learning with verifiable rewards"),
    "sft": (_sft, "supervised fine-tuning (LoRA or full) on chat JSONL, loss on assistant tokens"),
    "serve": (_serve, "OpenAI-compatible chat server for a model, checkpoint or run"),
    "eval": (_eval, "benchmarks: pass@1 with 95% CI, pass@k, maj@k; several models -> ablation table"),
    "distill": (_distill, "a teacher answers a dataset; graded-correct replies -> SFT traces + yield report"),
    "traces": (_traces, "combine, dedup, filter and shuffle trace files; dataset solutions -> traces"),
    "export": (_export, "a run or checkpoint as a merged HF model (vllm serve) or a portable LoRA adapter"),
    "report": (_report, "report.html of a run (curves, evals, samples); several runs -> one comparison page"),
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `mathrl train --help | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    # peft calls a transformers method that warns about its own rename; not actionable for users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-V", "--version"):
        print(f"mathrl {_version()}")
        return 0
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        if args and args[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(args[0], COMMANDS, n=1)
            hint = f"; did you mean `mathrl {close[0]}`?" if close else ""
            print(f"mathrl: unknown command {args[0]!r}{hint}\n", file=sys.stderr)
        print("usage: mathrl <command> [key=value ...] [config=FILE]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n`mathrl <command> --help` lists every key with its default; `mathrl --version`.")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[args[0]]
    from mathrl.runtime import tune_allocator

    tune_allocator()
    try:
        command(args[1:])
    except RuntimeError as e:
        if "torch" in sys.modules:  # first, and importing nothing: torchrun may stop this rank any moment
            from mathrl import parallel

            if parallel.lost_a_rank(e):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # say it, then go
                why = (
                    f"was stopped ({e}: torchrun stops every rank when one fails or the job is interrupted)"
                    if isinstance(e, parallel.RankStopped)
                    else "lost contact with another rank, which died or was killed"
                )
                print(
                    f"mathrl {args[0]}: error: rank {os.environ.get('RANK')} {why}; torchrun's report names the "
                    "failed rank; rerun the same command to resume from the last checkpoint",
                    file=sys.stderr,
                )
                return 1
        from mathrl.rollout.openai_backend import OpenAIBackendError

        if isinstance(e, OpenAIBackendError):  # an endpoint that is down or refuses: one line, what to check
            print(f"mathrl {args[0]}: error: {e} (check base_url and that the server is up)", file=sys.stderr)
            return 2
        raise
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mathrl")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
