"""The training curve: every curve visible (train reward drew exactly under train correct)."""

from __future__ import annotations

from mathrl.plots import _CURVES, plot_metrics, series


def test_an_identical_curve_is_labelled_with_the_one_it_would_hide_under(tmp_path):
    rows = [
        {"step": 0, "env/all/correct": 0.2, "env/all/reward/total": 0.2, "test/env/all/correct": 0.25},
        {"step": 1, "env/all/correct": 0.5, "env/all/reward/total": 0.5},
    ]
    drawn = series(rows, _CURVES)
    assert [label for label, *_ in drawn] == ["train correct = train reward", "test correct"]
    rows[1]["env/all/reward/total"] = 0.4  # a format penalty: the curves differ, both drawn
    assert [label for label, *_ in series(rows, _CURVES)] == ["train correct", "test correct", "train reward"]
    plot_metrics(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
