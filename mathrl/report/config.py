"""The options of ``mathrl report``, apart from the code that runs it (``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mathrl.config import option


@dataclass(frozen=True)
class ReportConfig:
    """Every knob of ``mathrl report``; the sample caps also bound the page's size."""

    runs: str = field(
        metadata=option(
            "Run directories (train, sft, eval or distill output), comma-separated; several = one comparison page."
        )
    )
    output: str = field(
        default="",
        metadata=option("The HTML file (default: RUN/report.html for one run, runs/compare-<time>.html for several)."),
    )
    labels: str = field(default="", metadata=option("Names for the runs, comma-separated (default: their folders)."))
    groups_per_step: int = field(
        default=4, metadata=option("Groups shown per step, picked by mean-reward quantile (as tinker-cookbook).", min=1)
    )
    completions_per_group: int = field(default=8, metadata=option("Most completions shown per group.", min=1))
    sample_steps: int = field(
        default=20, metadata=option("Most steps with samples in the browser (evenly spaced, last kept).", min=1)
    )
    max_chars: int = field(
        default=1500,
        metadata=option("Longest text shown (prompt, completion, code, output); the middle is cut.", min=80),
    )
