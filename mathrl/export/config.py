"""The options of ``mathrl export``, apart from the code that runs it: ``--help`` reads them
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mathrl.config import option


@dataclass(frozen=True)
class ExportConfig:
    """Every knob of ``mathrl export``."""

    model: str = field(
        metadata=option("A mathrl run directory (its latest checkpoint) or checkpoint directory (LoRA or full).")
    )
    output: str = field(metadata=option("Directory to write; must not exist or be empty (see overwrite)."))
    merge: bool = field(
        default=True,
        metadata=option(
            "true: one HF model, adapters merged in (AutoModelForCausalLM.from_pretrained, vllm serve); "
            "false: the LoRA adapter alone, naming its base's hub id (PeftModel.from_pretrained)."
        ),
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata=option("Weights of the merged model; auto: the base model's stored dtype (fp32 for the embedded)."),
    )
    overwrite: bool = field(default=False, metadata=option("Replace a non-empty output directory."))
