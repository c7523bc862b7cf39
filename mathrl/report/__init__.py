"""``report.html``: one self-contained page per run directory (train, sft, eval, distill), or
one page comparing several runs (``mathrl report runs=A,B``).

The page holds the resolved config, the curves (inline SVG), the evaluation tables, a sample
browser (a few groups per step picked by reward quantile, every turn and tool call of an
episode, right/wrong filter) and the checkpoints. No network: no CDN, no fonts, no fetch.
:mod:`mathrl.report.build` reads a run into plain data, :mod:`mathrl.report.html` renders it.

Training, SFT, eval and distill call :func:`report_safely` where they write their other
outputs: a report that cannot be written prints one warning line and never stops a run.
Imports no torch: it costs a run nothing to load.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from mathrl.config import ConfigError
from mathrl.report.build import charts, read_run
from mathrl.report.config import ReportConfig
from mathrl.report.html import render
from mathrl.tracking import atomic_write_text

__all__ = ["ReportConfig", "report_safely", "run_report", "write_report"]


def write_report(paths: list[Path], output: Path, cfg: ReportConfig, labels: list[str] | None = None) -> Path:
    """Read ``paths`` and write their page to ``output`` (atomically); returns ``output``."""
    labels = labels or run_labels(paths)
    runs = [read_run(p, label, cfg) for p, label in zip(paths, labels, strict=True)]
    main, other = charts(runs)
    atomic_write_text(output, render(runs, main, other, cfg))
    return output


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name; its parent joins it where two names are equal."""
    names = [p.resolve().name for p in paths]
    return ["/".join(p.resolve().parts[-2:]) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def run_report(cfg: ReportConfig) -> Path:
    """``mathrl report``: check the arguments, write the page, say where."""
    paths = [Path(p.strip()) for p in cfg.runs.split(",") if p.strip()]
    if not paths:
        raise ConfigError("runs: expected one or more run directories, comma-separated")
    for p in paths:
        if not p.is_dir():
            raise ConfigError(f"runs: {p} is not a directory; pass a run directory (a log_path or output_dir)")
    labels = [x.strip() for x in cfg.labels.split(",") if x.strip()]
    if labels and len(labels) != len(paths):
        raise ConfigError(f"labels: {len(labels)} labels for {len(paths)} runs")
    if cfg.output:
        output = Path(cfg.output)
    elif len(paths) == 1:
        output = paths[0] / "report.html"
    else:
        output = Path(f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}.html")
    if not output.parent.is_dir():
        if cfg.output:
            raise ConfigError(f"output: the folder {output.parent} does not exist; create it or pick another file")
        output.parent.mkdir(parents=True)
    write_report(paths, output, cfg, labels or None)
    print(f"report: {output}")
    return output


def report_safely(run_dir: Path) -> None:
    """Rewrite ``run_dir/report.html``; on any failure print one warning line and go on (a
    report is never worth a run)."""
    try:
        write_report([run_dir], run_dir / "report.html", ReportConfig(runs=str(run_dir)))
    except Exception as e:
        print(f"warning: {run_dir / 'report.html'} not written ({type(e).__name__}: {e})", file=sys.stderr)
