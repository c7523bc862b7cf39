"""Supervised fine-tuning on chat conversations: ``mathrl sft``; one step is ``train_step``.

Each conversation is rendered with the model's own chat template; the loss is the mean
negative log-likelihood of the assistant tokens (all assistant messages, or the last one:
tinker-cookbook's ``train_on_what``). Each step takes ``batch_size`` conversations (a seeded
shuffle per epoch, so step ``i``'s batch is a pure function of ``(seed, i)`` and a resumed
run sees what an uninterrupted one would), runs them in ``grad_accum_steps`` micro-batches,
and takes one AdamW step.

Choices worth knowing:
- Which tokens carry loss is found by rendering prefixes of the conversation with the chat
  template and diffing token ids (``loss_mask``), never by searching for a template's
  markers, so any template that renders a conversation as the concatenation of its
  prefixes works; one that does not (e.g. one that rewrites earlier turns) is an error.
- An assistant turn's loss covers its content and the end-of-turn token (``<|im_end|>``),
  the token that makes the model stop; not the turn header (``<|im_start|>assistant\\n``),
  which the prompt supplies at inference, nor what the template writes after the
  end-of-turn token (ChatML's newline), which the model never generates.
- The step's loss is the sum of NLL over its loss tokens divided by their number in the
  whole step, not per micro-batch, so gradient accumulation gives the same update as one
  big batch. The LM head and log-softmax run only at loss positions, a chunk at a time.
- Conversations longer than ``max_length`` tokens are cut at ``max_length`` (counted in
  ``num_truncated``); trailing tokens with no loss are dropped first, so a conversation
  counts as truncated only when assistant tokens were cut.
- Batches do not cross epochs: each epoch has ``len(train) // batch_size`` steps, and the
  few conversations left over are different ones in each epoch (a fresh shuffle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mathrl import parallel
from mathrl.checkpoint import latest_checkpoint
from mathrl.models import check_model_name, load_model, load_tokenizer
from mathrl.parallel import World
from mathrl.plots import plot_metrics
from mathrl.report import report_safely
from mathrl.rl.batching import ActionScorer, Datum, collate, score
from mathrl.tracking import ProgressBar, closes_trackers
from mathrl.train.configs import SFTConfig as SFTConfig  # re-exported
from mathrl.train.configs import TrainOnWhat
from mathrl.train.run import lr_multiplier as lr_multiplier  # re-exported: the schedule is shared
from mathrl.train.run import make_optimizer, make_policy, restore_optimizer, restore_weights, start_run
from mathrl.train.run import save as checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Keys that may change between a run and its resumption without changing what it computes.
_RESUMABLE_CHANGES = {"max_steps", "eval_every", "save_every", "log_path", "num_threads", "grad_accum_steps"}
_ONE_PROCESS = World()


@dataclass(frozen=True)
class Example:
    """One training sequence: its tokens and which of them are predicted with loss."""

    tokens_T: tuple[int, ...]
    loss_mask_T: tuple[bool, ...]  # token t carries loss (predicted from position t-1)
    truncated: bool = False
    problem_id: str = ""


# --- pure parts: the loss mask and the learning-rate schedule -------------------------------


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(out)


def loss_mask(
    tokenizer: Any, messages: Sequence[dict[str, Any]], train_on_what: TrainOnWhat, end_of_turn_ids: Sequence[int]
) -> tuple[list[int], list[bool]]:
    """Tokens of the conversation in the chat template, and which carry loss.

    Assistant message i spans the tokens between the rendering of ``messages[:i]`` with the
    generation prompt (so the header is excluded) and the rendering of ``messages[:i+1]``;
    of that span, loss stops at its last end-of-turn token (any of ``end_of_turn_ids``), so
    a template's separator after it (ChatML's newline) carries none. Each rendering must be
    a prefix of the whole conversation's; a ValueError says which message breaks that.
    """
    tokens = _render(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(tokens)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("the conversation has no assistant message")
    if train_on_what == "last_assistant_message":
        assistant = assistant[-1:]
    end_ids = set(end_of_turn_ids)
    for i in assistant:
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        stop = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        for name, part in (("up to its header", start), ("up to its end", stop)):
            if tokens[: len(part)] != part:
                raise ValueError(
                    f"the chat template does not render the conversation as a concatenation of its turns: "
                    f"rendering messages[0..{i}] {name} is not a prefix of the whole conversation "
                    "(a template that rewrites earlier turns needs train_on_what=last_assistant_message "
                    "and the turn's prefix unchanged)"
                )
        lo, hi = len(start), len(stop)
        ends = [t for t in range(lo, hi) if tokens[t] in end_ids]
        if ends:
            hi = ends[-1] + 1
        mask[lo:hi] = [True] * (hi - lo)
    return tokens, mask


def plain_loss_mask(
    tokenizer: Any, messages: Sequence[dict[str, Any]], train_on_what: TrainOnWhat
) -> tuple[list[int], list[bool]]:
    """``prompt_format=plain`` (a model without a chat template): the prompt before the last
    assistant message as the plain text it is sampled from (:func:`mathrl.prompts.plain_prompt`,
    tokenized alone, as at inference), then that reply after a space and the end-of-text token,
    which alone carry loss. Earlier assistant messages are context (few-shot examples); training
    on them needs a chat template, so ``all_assistant_messages`` with several is refused."""
    from mathrl.prompts import plain_prompt
    from mathrl.types import Message

    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("the conversation has no assistant message")
    if len(assistant) > 1 and train_on_what == "all_assistant_messages":
        raise ValueError(
            "prompt_format=plain trains the last assistant message only (earlier ones are context): "
            "pass train_on_what=last_assistant_message"
        )
    last = assistant[-1]
    prompt = list(tokenizer(plain_prompt([Message(m["role"], m["content"]) for m in messages[:last]]))["input_ids"])
    reply = list(tokenizer(" " + messages[last]["content"], add_special_tokens=False)["input_ids"])
    reply.append(int(tokenizer.eos_token_id))
    return prompt + reply, [False] * len(prompt) + [True] * len(reply)


def truncate(tokens: Sequence[int], mask: Sequence[bool], max_length: int) -> tuple[list[int], list[bool], bool]:
    """Drop trailing tokens without loss, then cut to ``max_length``; report whether loss tokens were cut."""
    end = max((t for t, m in enumerate(mask) if m), default=-1) + 1
    truncated = end > max_length
    end = min(end, max_length)
    return list(tokens[:end]), list(mask[:end]), truncated


# --- data ----------------------------------------------------------------------------------


def read_conversations(path: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(problem_id, messages) per line of a chat JSONL file; errors name file:line:field."""
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise ValueError(f"{where}: messages: expected a non-empty list of {{role, content}} objects")
        for j, m in enumerate(row["messages"]):
            if not isinstance(m, dict):
                raise ValueError(f"{where}: messages[{j}]: expected an object with role and content")
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    raise ValueError(f"{where}: messages[{j}].{key}: expected a string, got {m.get(key)!r}")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise ValueError(f"{where}: messages: no assistant message, so nothing to train on")
        problem_id = row.get("problem_id", row.get("id"))
        rows.append((str(problem_id) if problem_id is not None else f"{path}:{lineno}", row["messages"]))
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows


def split_by_problem(
    rows: list[tuple[str, list[dict[str, Any]]]], fraction: float, seed: int
) -> tuple[list[tuple[str, list[dict[str, Any]]]], list[tuple[str, list[dict[str, Any]]]]]:
    """(train, test): ``round(fraction * problems)`` problems (at least 1 when fraction > 0)
    go to test, chosen by a seeded hash of the id, so no problem is in both."""
    ids = sorted({pid for pid, _ in rows}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_test = 0 if fraction <= 0 else max(1, round(fraction * len(ids)))
    if fraction > 0 and n_test >= len(ids):
        raise ValueError(f"test_fraction={fraction}: {len(ids)} problem(s) leave none to train on")
    test_ids = set(ids[:n_test])
    return [r for r in rows if r[0] not in test_ids], [r for r in rows if r[0] in test_ids]


def make_examples(
    rows: list[tuple[str, list[dict[str, Any]]]], tokenizer: Any, cfg: SFTConfig, source: str
) -> list[Example]:
    from mathrl.models import eos_token_ids

    end_ids = eos_token_ids(tokenizer)
    examples = []
    for n, (pid, messages) in enumerate(rows):
        try:
            if cfg.prompt_format == "plain":
                tokens, mask = plain_loss_mask(tokenizer, messages, cfg.train_on_what)
            else:
                tokens, mask = loss_mask(tokenizer, messages, cfg.train_on_what, end_ids)
        except ValueError as e:
            raise ValueError(f"{source}: conversation {n + 1} (problem_id {pid}): {e}") from None
        tokens, mask, cut = truncate(tokens, mask, cfg.max_length)
        examples.append(Example(tuple(tokens), tuple(mask), cut, pid))
    return examples


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of ``step``: batch ``step % steps_per_epoch`` of epoch ``step // steps_per_epoch``'s shuffle."""
    steps_per_epoch = n_examples // batch_size
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[pos * batch_size : (pos + 1) * batch_size].tolist()


# --- the model side ------------------------------------------------------------------------


def nll_sum(scorer: torch.nn.Module, examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Sum of -log p over the loss tokens of ``examples``, through ``scorer`` (an
    :class:`~mathrl.rl.batching.ActionScorer` of the policy, possibly wrapped for data
    parallelism): the body once, the LM head only at positions that predict a loss token."""
    device = next(scorer.parameters()).device
    datums = [Datum(e.tokens_T, e.loss_mask_T, (0.0,) * len(e.tokens_T), 0.0) for e in examples]
    batch = collate(datums, pad_id, share_prefix=False)
    batch = batch if device.type == "cpu" else batch.to(device)
    logp_BT, _ = score(scorer, batch, entropy=False)
    return -(logp_BT * batch.action_mask_BT).sum()


def micro_batches(examples: Sequence[Example], n: int) -> list[list[Example]]:
    """``n`` micro-batches of length-sorted examples (similar lengths pad together)."""
    ordered = sorted(examples, key=lambda e: len(e.tokens_T))
    return [[ordered[i] for i in part] for part in np.array_split(np.arange(len(ordered)), n) if len(part)]


def train_step(
    scorer: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    *,
    grad_accum_steps: int,
    pad_id: int,
    bf16: bool,
    max_grad_norm: float,
    lr: float | None = None,
    world: World = _ONE_PROCESS,
) -> dict[str, float]:
    """One SFT step: token-mean NLL over all loss tokens of ``examples``, accumulated over
    ``grad_accum_steps`` micro-batches, then gradient clipping and one AdamW step (at ``lr``
    when given, else at what the optimizer's schedule set).

    Under torchrun each micro-batch's conversations are shared out over the ranks, and the
    loss is normalised by the whole step's loss tokens times the world size (DDP and FSDP2
    average gradients over ranks): the update is one process's on the same batch."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    n_loss = sum(sum(e.loss_mask_T) for e in examples)
    device = next(scorer.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    total_nll = 0.0
    parts = micro_batches(examples, grad_accum_steps)
    for k, micro in enumerate(parts):
        rows, real = parallel.shard(len(micro), world)
        with parallel.no_sync(scorer, last=k == len(parts) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                nll = nll_sum(scorer, [micro[r] for r in rows], pad_id) * float(real)
            # normalised by the whole step's tokens: accumulation and sharding = one batch
            (nll * world.size / max(n_loss, 1)).backward()
        total_nll += float(nll.detach())
    params = [p for p in scorer.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    optimizer.step()
    (total_nll,) = parallel.all_sum([total_nll], world)
    return {
        "train_mean_nll": total_nll / max(n_loss, 1),
        "optim/grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
        "num_sequences": len(examples),
        "num_tokens": sum(len(e.tokens_T) for e in examples),
        "num_loss_tokens": n_loss,
        "num_truncated": sum(e.truncated for e in examples),
    }


@torch.no_grad()
def mean_nll(
    scorer: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch: int, bf16: bool,
    world: World = _ONE_PROCESS,
) -> float:  # fmt: skip
    """Token-mean NLL of the loss tokens of ``examples`` (the held-out metric; every rank
    computes its share of each micro-batch)."""
    device = next(scorer.parameters()).device
    total, n_loss = 0.0, sum(sum(e.loss_mask_T) for e in examples)
    for micro in micro_batches(examples, math.ceil(len(examples) / batch)):
        rows, real = parallel.shard(len(micro), world)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += float(nll_sum(scorer, [micro[r] for r in rows], pad_id)) * float(real)
    (total,) = parallel.all_sum([total], world)
    return total / max(n_loss, 1)


# --- the run -------------------------------------------------------------------------------


@closes_trackers
def sft(cfg: SFTConfig, progress: bool = True) -> Path:
    """Run (or resume) supervised fine-tuning; return the run directory."""
    check_model_name(cfg.model_name, "model_name")  # before anything is created
    if cfg.test_file is None and cfg.test_fraction == 0:
        print("note: no held-out set (test_fraction=0 and no test_file): test/nll is not measured")
    # --- data: render, mask, truncate once (a bad file is refused before log_path is made) -----
    tokenizer = load_tokenizer(cfg.model_name, cfg.prompt_format)
    rows = read_conversations(cfg.train_file)
    if cfg.test_file:
        train_rows, test_rows = rows, read_conversations(cfg.test_file)
    else:
        train_rows, test_rows = split_by_problem(rows, cfg.test_fraction, cfg.seed)
    train_set = make_examples(train_rows, tokenizer, cfg, cfg.train_file)
    test_set = make_examples(test_rows, tokenizer, cfg, cfg.test_file or cfg.train_file)
    # A conversation cut before its first loss token teaches nothing (and a batch of them has no loss).
    n_empty = sum(not any(e.loss_mask_T) for e in train_set)
    if train_set and n_empty == len(train_set):
        raise ValueError(
            f"max_length={cfg.max_length} cuts every conversation in {cfg.train_file} before its first trained "
            "token; raise max_length"
        )
    train_set = [e for e in train_set if any(e.loss_mask_T)]
    test_set = [e for e in test_set if any(e.loss_mask_T)]
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size}: only {len(train_set)} training conversations")
    steps_per_epoch = len(train_set) // cfg.batch_size
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * steps_per_epoch
    n_cut = sum(e.truncated for e in train_set)

    cfg, run = start_run(cfg, f"runs/sft-{datetime.now():%Y%m%d-%H%M%S}", _RESUMABLE_CHANGES)
    world, device, log_path = run.world, run.device, run.log_path
    if world.main:
        print(
            f"sft: {len(train_set)} train / {len(test_set)} held-out conversations, {steps_per_epoch} steps per "
            f"epoch, {max_steps} steps; {n_cut} truncated at max_length={cfg.max_length}"
            + (f", {n_empty} dropped (no trained token within it)" if n_empty else "")
        )

    # --- model and optimizer: mathrl train's (mathrl.train.run) ----------------------------
    policy, _ = make_policy(
        lambda dtype: load_model(cfg.model_name, dtype), lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        train_bf16=cfg.train_bf16, parallel_mode=cfg.parallel, world=world, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )  # fmt: skip
    start_step = restore_weights(run, policy, cfg.lora_rank)
    policy.to(device).train()
    scorer = parallel.wrap(ActionScorer(policy), cfg.parallel, world, device)
    optimizer, scheduler = make_optimizer(scorer, cfg, max_steps, cfg.warmup_steps)
    restore_optimizer(run, optimizer, scheduler)
    if run.checkpoint is not None and world.main:
        print(f"resuming {log_path} from its checkpoint at step {start_step} ({run.checkpoint.name})")
    logger = run.logger(start_step)
    pad_id = tokenizer.pad_token_id
    eval_batch = max(1, cfg.batch_size // cfg.grad_accum_steps)

    def evaluate() -> dict[str, float]:
        if not test_set:
            return {}
        t0 = time.time()
        scorer.eval()
        nll = mean_nll(scorer, test_set, pad_id, eval_batch, cfg.train_bf16, world)
        scorer.train()
        return {"test/nll": nll, "time/eval": time.time() - t0}

    bar = ProgressBar("sft", max_steps, start_step, progress and world.main, "test/nll", "held-out nll",
                      lambda m: f"nll {m['train_mean_nll']:.3f}", digits=4)  # fmt: skip
    run_start = time.time()
    # --- the loop -------------------------------------------------------------------------
    for step in range(start_step, max_steps):
        t_step = time.time()
        metrics: dict[str, float] = {}
        if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
            metrics |= evaluate()
        batch = [train_set[i] for i in batch_indices(len(train_set), cfg.batch_size, step, cfg.seed)]
        lr = float(scheduler.get_last_lr()[0])
        metrics |= train_step(
            scorer, optimizer, batch, grad_accum_steps=cfg.grad_accum_steps, pad_id=pad_id,
            bf16=cfg.train_bf16, max_grad_norm=cfg.max_grad_norm, world=world,
        )  # fmt: skip
        scheduler.step()
        metrics |= {"optim/lr": lr, "progress/epoch": (step + 1) / steps_per_epoch}
        metrics["time/step"] = time.time() - t_step
        metrics["time/total"] = time.time() - run_start
        metrics["mem/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if logger is not None:  # logged before the checkpoint: a kill between the two redoes the step
            logger.log(step, metrics)
            if "test/nll" in metrics:
                report_safely(log_path)
        bar.update(step, metrics)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < max_steps:
            checkpoint(run, step + 1, scorer, tokenizer, optimizer, scheduler)

    # --- the end: final checkpoint, then the held-out NLL of exactly those weights -----------
    if start_step < max_steps or latest_checkpoint(log_path) is None:
        checkpoint(run, max_steps, scorer, tokenizer, optimizer, scheduler, final=True)
    final = evaluate()
    if logger is not None:
        logger.log(max_steps, {**final, "time/total": time.time() - run_start})
        plot_metrics(logger.rows(), log_path / "plot.png", title=f"sft | {cfg.model_name}", curves=_CURVES,
                     ylabel="NLL per token", ylim=None)  # fmt: skip
        report_safely(log_path)
    bar.close(final)
    parallel.barrier(world)
    return log_path


_CURVES = (("train_mean_nll", "train NLL", "-"), ("test/nll", "held-out NLL", "o-"))
