"""Training curves from metrics.jsonl rows, as a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CURVES = [
    ("env/all/correct", "train correct", "-"),
    ("test/env/all/correct", "test correct", "o-"),
    ("env/all/reward/total", "train reward", ":"),
]


def series(
    rows: Sequence[dict[str, Any]], curves: Sequence[tuple[str, str, str]]
) -> list[tuple[str, str, tuple[float, ...], tuple[float, ...]]]:
    """(label, style, steps, values) of each curve with points. A curve equal to one before it
    is not drawn again (it would hide exactly under it: train reward = train correct on
    arithmetic); its label joins the first's, e.g. "train correct = train reward"."""
    out: list[tuple[str, str, tuple[float, ...], tuple[float, ...]]] = []
    for key, label, style in curves:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        xs, ys = (tuple(v) for v in zip(*points, strict=True))
        same = next((i for i, (_, _, x, y) in enumerate(out) if (x, y) == (xs, ys)), None)
        if same is None:
            out.append((label, style, xs, ys))
        else:
            first = out[same]
            out[same] = (f"{first[0]} = {label}", *first[1:])
    return out


def plot_metrics(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
    curves: Sequence[tuple[str, str, str]] = _CURVES,
    ylabel: str = "",
    ylim: tuple[float, float] | None = (-0.02, 1.02),
) -> None:
    """Plot ``curves`` (metric key, label, line style) per step; written atomically.
    By default train/test reward and accuracy of ``mathrl train``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, style, xs, ys in series(rows, curves):
        ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
