"""The options of the training commands (``mathrl train``, ``sft``, ``distill``, ``traces``),
apart from the code that runs them: ``--help`` reads these without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mathrl import EMBEDDED_MODEL
from mathrl.config import option
from mathrl.grading import GRADER_HELP, GRADERS
from mathrl.prompts import PROMPT_FORMAT_CHOICES, PROMPT_FORMAT_HELP, TINKER_SUFFIX
from mathrl.rl.losses import AGGREGATIONS, LOSSES  # torch-free: the registries are the choices
from mathrl.tools.formats import PARSER_CHOICES

TrainOnWhat = Literal["all_assistant_messages", "last_assistant_message"]
AnswerFrom = Literal["field", "boxed", "hashes"]

# The trackers of mathrl train and mathrl sft (mathrl.tracking.TRACKERS): the same keys and steps
# as metrics.jsonl, from rank 0. Declared once, added to both configs with tracker_option(key).
_TRACKER_HELP = {
    "wandb_project": "Also log to this Weights & Biases project (extra [wandb]; WANDB_MODE=offline: "
    "no network, the run stays in log_path/wandb). A resumed run continues the same wandb run.",
    "wandb_name": "wandb run name (default: log_path's directory name).",
    "tensorboard_dir": "Also write TensorBoard event files to this directory (extra [tensorboard]); "
    "a resumed run continues in it.",
}


def tracker_option(key: str) -> Any:
    """The dataclass field of tracker option ``key`` (off by default)."""
    return field(default="", metadata=option(_TRACKER_HELP[key]))


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
    loss_fn: str = field(
        default="importance_sampling",
        metadata=option(
            "Policy loss: importance_sampling (ratio * A), ppo (clipped ratio), cispo (MiniMax-M1: clipped, "
            "detached ratio * A * logp), gspo (Qwen: clipped sequence-level ratio; use loss_agg=seq_mean).",
            choices=tuple(LOSSES),
        ),
    )
    loss_agg: str = field(
        default="token_mean",
        metadata=option(
            "How per-token losses are combined: token_sum (sum / sequences), token_sum_norm (Dr. GRPO: "
            "sum / (sequences x max_tokens)), token_mean (DAPO), seq_mean (GRPO).",
            choices=tuple(AGGREGATIONS),
        ),
    )
    ppo_clip: float = field(
        default=0.2, metadata=option("Clip range of loss_fn=ppo/gspo/cispo (both sides unless set below).", min=0)
    )
    ppo_clip_low: float | None = field(
        default=None,
        metadata=option("Lower clip: ratio >= 1 - this (default: ppo_clip; cispo: no lower bound).", min=0),
    )
    ppo_clip_high: float | None = field(
        default=None, metadata=option("Upper clip: ratio <= 1 + this (default: ppo_clip; DAPO: 0.28).", min=0)
    )
    overlong_filter: bool = field(
        default=False, metadata=option("DAPO: leave completions cut off at max_tokens out of the loss.")
    )
    overlong_buffer: int = field(
        default=0,
        metadata=option(
            "DAPO's soft overlong penalty: the reward falls linearly from 0 at max_tokens - N tokens to "
            "-overlong_penalty at max_tokens (0 = off).",
            min=0,
        ),
    )
    overlong_penalty: float = field(default=1.0, metadata=option("Penalty at max_tokens (overlong_buffer).", min=0))
    dynamic_sampling: bool = field(
        default=False,
        metadata=option(
            "DAPO: draw more problems until groups_per_batch groups have reward spread (at most "
            "dynamic_sampling_max_draws extra batches).",
        ),
    )
    dynamic_sampling_max_draws: int = field(
        default=4, metadata=option("Most extra batches drawn per step by dynamic_sampling.", min=0)
    )
    grader: str = field(default="mathrl", metadata=option(GRADER_HELP, choices=tuple(GRADERS)))
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
    prompt_format: str = field(
        default="chat",
        metadata=option(PROMPT_FORMAT_HELP + ". plain: single-turn envs only.", choices=PROMPT_FORMAT_CHOICES),
    )
    eval_every: int = field(default=10, metadata=option("Test evaluation every N steps (0 = only at the end).", min=0))
    eval_temperature: float = field(default=0.0, metadata=option("Test sampling temperature (0 = greedy).", min=0))
    eval_n: int = field(default=1, metadata=option("Samples per test problem.", min=1))
    save_every: int = field(default=20, metadata=option("Checkpoint every N steps (0 = only the final one).", min=0))
    log_path: str | None = field(
        default=None, metadata=option("Run directory (default runs/<env>-<time>); reused = resume.")
    )
    wandb_project: str = tracker_option("wandb_project")
    wandb_name: str = tracker_option("wandb_name")
    tensorboard_dir: str = tracker_option("tensorboard_dir")
    seed: int = field(default=0, metadata=option("Seed for data, sampling and LoRA init."))
    train_bf16: bool = field(default=True, metadata=option("bf16 autocast for the training forward/backward."))
    sample_dtype: Literal["bfloat16", "float32"] = field(default="bfloat16", metadata=option("Sampler weights dtype."))
    device: str | None = field(default=None, metadata=option("cpu, cuda, ... (default: cuda if available)."))
    num_threads: int | None = field(default=None, metadata=option("torch CPU threads (default: all cores)."))
    sampler: str = field(
        default="local",
        metadata=option(
            "Who generates: local (in this process) or remote (an OpenAI-compatible server at base_url that takes "
            "token-id prompts and weight updates: vLLM or mathrl serve).",
            choices=("local", "remote"),
        ),
    )
    base_url: str = field(default="", metadata=option("sampler=remote: the server, e.g. http://127.0.0.1:8000/v1."))
    api_model: str = field(
        default="", metadata=option("sampler=remote: the served base model's name (it must serve model_name).")
    )
    max_off_policy_steps: int = field(
        default=0,
        metadata=option(
            "0: sample each batch with the latest weights (synchronous); N: sampling runs up to N steps ahead of "
            "training, overlapping it; groups sampled by weights older than N updates are dropped.",
            min=0,
        ),
    )
    is_cap: float | None = field(
        default=None,
        metadata=option(
            "Truncate the token-level importance weight pi_train/pi_sampler at this value (0 = off; "
            "default: off when synchronous, 2.0 when max_off_policy_steps > 0).",
            min=0,
        ),
    )
    parallel: str = field(
        default="ddp",
        metadata=option("Under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded).", choices=("ddp", "fsdp")),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=option("Recompute activations in the backward (less memory, ~30% more compute).")
    )
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


@dataclass(frozen=True)
class SFTConfig:
    """Every knob of ``mathrl sft``."""

    train_file: str = field(metadata=option('Chat JSONL: one {"messages": [{"role", "content"}, ...]} per line.'))
    test_file: str | None = field(
        default=None, metadata=option("Held-out chat JSONL for test/nll (default: split off test_fraction).")
    )
    test_fraction: float = field(
        default=0.05,
        metadata=option("Share of problems held out when no test_file (seeded, by problem_id).", min=0, max=0.5),
    )
    model_name: str = field(
        default=EMBEDDED_MODEL, metadata=option("HF hub id, local HF directory, or the embedded model.")
    )
    lora_rank: int = field(default=64, metadata=option("LoRA rank on all linear layers; 0 = full fine-tuning.", min=0))
    lora_alpha: int | None = field(default=None, metadata=option("LoRA alpha (default: = lora_rank)."))
    train_on_what: TrainOnWhat = field(
        default="all_assistant_messages", metadata=option("Which assistant messages carry loss.")
    )
    prompt_format: str = field(
        default="chat",
        metadata=option(PROMPT_FORMAT_HELP + ". plain: the last reply carries loss.", choices=PROMPT_FORMAT_CHOICES),
    )
    max_length: int = field(default=2048, metadata=option("Max tokens per conversation; longer ones are cut.", min=2))
    batch_size: int = field(default=16, metadata=option("Conversations per optimizer step.", min=1))
    grad_accum_steps: int = field(
        default=1, metadata=option("Forward/backward passes per step (memory only; same update).", min=1)
    )
    num_epochs: int = field(default=1, metadata=option("Passes over the training set.", min=1))
    max_steps: int | None = field(
        default=None, metadata=option("Stop after this many steps (default: num_epochs x steps per epoch).")
    )
    learning_rate: float = field(default=2e-4, metadata=option("AdamW peak learning rate.", min=0))
    lr_schedule: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata=option("Decay after warmup (reaching 0 at max_steps).")
    )
    warmup_steps: int = field(default=0, metadata=option("Linear warmup steps.", min=0))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay.", min=0))
    max_grad_norm: float = field(default=1.0, metadata=option("Gradient clipping (0 = off).", min=0))
    eval_every: int = field(default=10, metadata=option("test/nll every N steps (0 = only at 0 and the end).", min=0))
    save_every: int = field(default=20, metadata=option("Checkpoint every N steps (0 = only the final one).", min=0))
    log_path: str | None = field(
        default=None, metadata=option("Run directory (default runs/sft-<time>); reused = resume.")
    )
    wandb_project: str = tracker_option("wandb_project")
    wandb_name: str = tracker_option("wandb_name")
    tensorboard_dir: str = tracker_option("tensorboard_dir")
    seed: int = field(default=0, metadata=option("Seed for the data order, the held-out split and LoRA init."))
    train_bf16: bool = field(default=True, metadata=option("bf16 autocast for the forward/backward."))
    device: str | None = field(default=None, metadata=option("cpu, cuda, ... (default: cuda if available)."))
    num_threads: int | None = field(default=None, metadata=option("torch CPU threads (default: all cores)."))
    parallel: str = field(
        default="ddp",
        metadata=option("Under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded).", choices=("ddp", "fsdp")),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=option("Recompute activations in the backward (less memory, ~30% more compute).")
    )


@dataclass(frozen=True)
class DistillConfig:
    """Every knob of ``mathrl distill``."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=option("Teacher(s), comma-separated: hub id, local HF dir, mathrl checkpoint or run dir."),
    )
    labels: str = field(
        default="", metadata=option("Teacher names (the traces' source), comma-separated (default: derived).")
    )
    datasets: str = field(default="gsm8k", metadata=option("Comma-separated dataset names or files to answer."))
    split: str = field(default="train", metadata=option("Split of each dataset."))
    data_dir: str = field(default="", metadata=option("Directory with the local dataset files (or $MATHRL_DATA_DIR)."))
    fields: str = field(default="", metadata=option("Column mapping for files and hub ids, e.g. problem:question."))
    answer_from: AnswerFrom = field(
        default="field", metadata=option("Answer of files/hub ids: a field, boxed (solution), hashes (####).")
    )
    levels: str = field(default="", metadata=option("Keep only these levels, e.g. 4,5."))
    subjects: str = field(default="", metadata=option("Keep only these subjects, comma-separated."))
    limit: int = field(default=0, metadata=option("Only the first N problems of each dataset (0 = all).", min=0))
    n: int = field(default=4, metadata=option("Samples per problem.", min=1))
    temperature: float = field(default=0.7, metadata=option("Sampling temperature (0 = greedy).", min=0))
    top_p: float = field(default=1.0, metadata=option("Nucleus sampling mass.", min=0, max=1))
    max_tokens: int = field(default=2048, metadata=option("Max new tokens per sample.", min=1))
    seed: int = field(default=0, metadata=option("Sampling seed (samples are drawn per problem from it)."))
    suffix: str = field(default=TINKER_SUFFIX, metadata=option("Text appended to each problem."))
    few_shot: int = field(default=0, metadata=option("Solved examples shown to the teacher (0-2).", min=0, max=2))
    system_prompt: str = field(default="", metadata=option("Optional system message (kept in the traces)."))
    prompt_format: str = field(
        default="chat", metadata=option(PROMPT_FORMAT_HELP + ". Local teachers only.", choices=PROMPT_FORMAT_CHOICES)
    )
    style: str = field(default="", metadata=option("Answer extraction: boxed or gsm8k (default: by dataset)."))
    keep_truncated: bool = field(
        default=False, metadata=option("Also keep correct replies cut off at max_tokens as traces.")
    )
    grader: str = field(default="mathrl", metadata=option(GRADER_HELP, choices=tuple(GRADERS)))
    dtype: Literal["bf16", "fp32"] = field(
        default="bf16", metadata=option("Local weights: bf16 is faster on CPU; fp32 samples the same however batched.")
    )
    chunk_size: int = field(default=64, metadata=option("Problems per generation call (rows land per chunk).", min=1))
    base_url: str = field(default="", metadata=option("OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."))
    api_model: str = field(default="", metadata=option("Model name at base_url."))
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=option("Env var holding the endpoint's API key."))
    concurrency: int = field(default=8, metadata=option("Parallel requests to the endpoint.", min=1))
    max_retries: int = field(default=5, metadata=option("Retries of a failed request (429, 5xx, network).", min=0))
    timeout_s: float = field(default=300.0, metadata=option("Per-request timeout in seconds.", min=1))
    grading_timeout: float = field(default=2.0, metadata=option("Wall-clock limit per answer comparison.", min=0.1))
    output_dir: str = field(
        default="", metadata=option("Where results go (default runs/distill-<time>); reuse to resume.")
    )


@dataclass(frozen=True)
class TracesConfig:
    """Every knob of ``mathrl traces``: inputs -> drop exact duplicates -> sources -> lengths
    -> per_problem -> shuffle -> output."""

    output: str = field(metadata=option("The trace file to write (JSONL)."))
    inputs: str = field(default="", metadata=option("Trace files to combine, comma-separated (earlier first)."))
    from_dataset: str = field(
        default="", metadata=option("Also turn these datasets' reference solutions into traces (comma-separated).")
    )
    split: str = field(default="train", metadata=option("from_dataset: split."))
    data_dir: str = field(default="", metadata=option("from_dataset: directory with local dataset files."))
    fields: str = field(default="", metadata=option("from_dataset: column mapping for files and hub ids."))
    answer_from: AnswerFrom = field(default="field", metadata=option("from_dataset: where a file's answer is."))
    levels: str = field(default="", metadata=option("from_dataset: keep only these levels, e.g. 4,5."))
    subjects: str = field(default="", metadata=option("from_dataset: keep only these subjects."))
    limit: int = field(default=0, metadata=option("from_dataset: first N problems of each (0 = all).", min=0))
    suffix: str = field(default=TINKER_SUFFIX, metadata=option("from_dataset: text appended to each problem."))
    system_prompt: str = field(default="", metadata=option("from_dataset: optional system message."))
    sources: str = field(default="", metadata=option("Keep only traces from these sources, comma-separated."))
    min_chars: int = field(default=0, metadata=option("Drop replies shorter than this many characters.", min=0))
    max_chars: int = field(default=0, metadata=option("Drop replies longer than this (0 = no limit).", min=0))
    max_tokens: int = field(default=0, metadata=option("Drop replies of more tokens (0 = no limit).", min=0))
    tokenizer: str = field(
        default=EMBEDDED_MODEL, metadata=option("Tokenizer counting max_tokens and from_dataset's num_tokens.")
    )
    per_problem: int = field(
        default=0, metadata=option("Keep the first K traces of each problem (1 = dedup by problem; 0 = all).", min=0)
    )
    shuffle: bool = field(default=True, metadata=option("Shuffle the output."))
    seed: int = field(default=0, metadata=option("Shuffle seed."))
