"""Tables of benchmark summaries: one model in detail, several models side by side.

The ablation table has a row per model (baseline, SFT, RL ...) and a column per
benchmark, each cell pass@1 in percent with its 95% interval. It is written as
Markdown (printed and saved), CSV and JSON, so it can go into a paper, a spreadsheet or
another script.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from mathrl.eval.metrics import BenchmarkSummary
from mathrl.tracking import atomic_write_text


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(s: BenchmarkSummary) -> str:
    """``23.5 [20.1, 27.3]``: pass@1 (%) and its 95% interval."""
    return f"{pct(s.pass1)} [{pct(s.pass1_low)}, {pct(s.pass1_high)}]"


def detail_markdown(label: str, summaries: Sequence[BenchmarkSummary]) -> str:
    """Every figure of one model: pass@1 with CI, pass@k, maj@k, tokens, truncation."""
    tools = any(s.tools for s in summaries)
    tool_head = " turns | tool calls | tool errors | valid calls |" if tools else ""
    lines = [
        f"### {label}",
        "",
        "| benchmark | problems | n | pass@1 [95% CI] | pass@k | maj@k | mean tokens | truncated | no answer |"
        + tool_head,
        "|---|---|---|---|---|---|---|---|---|" + "---|---|---|---|" * tools,
    ]
    for s in summaries:
        pass_k = ", ".join(f"@{k} {pct(v)}" for k, v in s.pass_at.items())
        maj_k = ", ".join(f"@{k} {pct(v)}" for k, v in s.maj_at.items())
        t = s.tools
        tool_cells = (
            f" {t['mean_turns']:.2f} | {t['mean_tool_calls']:.2f} | {t['mean_tool_errors']:.2f} | "
            f"{pct(t['valid_call_rate'])}% |"
            if t
            else " - | - | - | - |"
        )
        lines.append(
            f"| {s.benchmark} | {s.problems} | {s.samples_per_problem} | {cell(s)} | {pass_k} | {maj_k} | "
            f"{s.mean_tokens:.0f} | {pct(s.truncation_rate)}% | {pct(s.no_answer_rate)}% |"
            + (tool_cells if tools else "")
        )
    return "\n".join(lines)


def ablation_markdown(results: Mapping[str, Sequence[BenchmarkSummary]]) -> str:
    """Models (rows) x benchmarks (columns), pass@1 % [95% CI]."""
    benchmarks = list(dict.fromkeys(s.benchmark for summaries in results.values() for s in summaries))
    lines = [
        "| model | " + " | ".join(benchmarks) + " |",
        "|---|" + "---|" * len(benchmarks),
    ]
    for label, summaries in results.items():
        by_name = {s.benchmark: s for s in summaries}
        cells = [cell(by_name[b]) if b in by_name else "-" for b in benchmarks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\npass@1 in %, with the 95% confidence interval (Wilson, design-effect corrected)."


def write_reports(out_dir: Path, results: Mapping[str, Sequence[BenchmarkSummary]]) -> str:
    """Write ablation.md / .csv / .json and the per-model details; return the Markdown."""
    markdown = ablation_markdown(results)
    details = "\n\n".join(detail_markdown(label, summaries) for label, summaries in results.items())
    atomic_write_text(out_dir / "ablation.md", markdown + "\n\n" + details + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    every = [s for summaries in results.values() for s in summaries]
    ks = sorted({k for s in every for k in s.pass_at} | {k for s in every for k in s.maj_at})
    writer.writerow(
        ["model", "benchmark", "problems", "n", "pass@1", "ci_low", "ci_high", "mean_tokens", "truncated",
         "no_answer", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]
    )  # fmt: skip
    for label, summaries in results.items():
        for s in summaries:
            at = [f"{s.pass_at[k]:.4f}" if k in s.pass_at else "" for k in ks]
            maj = [f"{s.maj_at[k]:.4f}" if k in s.maj_at else "" for k in ks]
            writer.writerow(
                [label, s.benchmark, s.problems, s.samples_per_problem, f"{s.pass1:.4f}", f"{s.pass1_low:.4f}",
                 f"{s.pass1_high:.4f}", f"{s.mean_tokens:.1f}", f"{s.truncation_rate:.4f}",
                 f"{s.no_answer_rate:.4f}", *at, *maj]
            )  # fmt: skip
    atomic_write_text(out_dir / "ablation.csv", buffer.getvalue())
    data = {label: [asdict(s) for s in summaries] for label, summaries in results.items()}
    atomic_write_text(out_dir / "ablation.json", json.dumps(data, indent=2) + "\n")
    return markdown + "\n\n" + details
