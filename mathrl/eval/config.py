"""The options of ``mathrl eval``, apart from the code that runs it: ``--help`` reads them
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mathrl import EMBEDDED_MODEL
from mathrl.config import option
from mathrl.grading import GRADER_HELP, GRADERS
from mathrl.prompts import PROMPT_FORMAT_CHOICES, PROMPT_FORMAT_HELP, TINKER_SUFFIX
from mathrl.tools.formats import PARSER_CHOICES


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of ``mathrl eval``."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=option("Model(s), comma-separated: hub id, local HF dir, mathrl checkpoint or run dir."),
    )
    labels: str = field(default="", metadata=option("Row names for the models, comma-separated (default: derived)."))
    benchmarks: str = field(default="math500", metadata=option("Comma-separated dataset names or files."))
    split: str = field(default="test", metadata=option("Split of each benchmark."))
    data_dir: str = field(default="", metadata=option("Directory with the local dataset files (or $MATHRL_DATA_DIR)."))
    limit: int = field(default=0, metadata=option("Only the first N problems of each benchmark (0 = all).", min=0))
    n: int = field(default=1, metadata=option("Samples per problem.", min=1))
    temperature: float = field(default=0.0, metadata=option("Sampling temperature (0 = greedy).", min=0))
    top_p: float = field(default=1.0, metadata=option("Nucleus sampling mass.", min=0, max=1))
    max_tokens: int = field(default=1024, metadata=option("Max new tokens per sample.", min=1))
    seed: int = field(default=0, metadata=option("Sampling seed."))
    suffix: str = field(default=TINKER_SUFFIX, metadata=option("Text appended to each problem."))
    few_shot: int = field(default=0, metadata=option("Solved examples before each problem (0-2).", min=0, max=2))
    system_prompt: str = field(default="", metadata=option("Optional system message."))
    prompt_format: str = field(
        default="chat", metadata=option(PROMPT_FORMAT_HELP + ". Local models only.", choices=PROMPT_FORMAT_CHOICES)
    )
    style: str = field(default="", metadata=option("Answer extraction: boxed or gsm8k (default: by benchmark)."))
    tools: str = field(
        default="",
        metadata=option("python: the model may call a sandboxed Python tool (episodes).", choices=("", "python")),
    )
    tool_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=option("Tool options, e.g. tool_args.max_tool_calls=4 (see math_python's env_args)."),
    )
    tool_parser: str = field(
        default="auto",
        metadata=option("Tool-call format (local models): auto, hermes, qwen3_coder.", choices=PARSER_CHOICES),
    )
    max_turns: int = field(default=10, metadata=option("Most turns per episode with tools.", min=1))
    dtype: Literal["bf16", "fp32"] = field(
        default="bf16",
        metadata=option("Local weights: bf16 is ~3x faster on CPU; fp32 gives the same answers however batched."),
    )
    chunk_size: int = field(default=64, metadata=option("Problems per generation call (local models).", min=1))
    base_url: str = field(default="", metadata=option("OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."))
    api_model: str = field(default="", metadata=option("Model name at base_url."))
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=option("Env var holding the endpoint's API key."))
    concurrency: int = field(default=8, metadata=option("Parallel requests to the endpoint.", min=1))
    max_retries: int = field(default=5, metadata=option("Retries of a failed request (429, 5xx, network).", min=0))
    timeout_s: float = field(default=300.0, metadata=option("Per-request timeout in seconds.", min=1))
    grading_timeout: float = field(default=2.0, metadata=option("Wall-clock limit per answer comparison.", min=0.1))
    grader: str = field(default="mathrl", metadata=option(GRADER_HELP, choices=tuple(GRADERS)))
    regrade: bool = field(default=False, metadata=option("Grade finished problems again with the current grader."))
    output_dir: str = field(
        default="", metadata=option("Where results go (default runs/eval-<time>); reuse to resume.")
    )
