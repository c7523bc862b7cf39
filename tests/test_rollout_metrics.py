"""Summary metrics of trajectory groups, computed by hand."""

import pytest

from mathrl.rollout.metrics import group_metrics
from mathrl.types import Completion, Trajectory, TrajectoryGroup, Transition


def _traj(correct: float, n_tokens: int, finish: str = "stop") -> Trajectory:
    comp = Completion(tuple(range(n_tokens)), (0.0,) * n_tokens, finish)  # type: ignore[arg-type]
    return Trajectory((Transition((1,), comp, "", correct, True, {"correct": correct, "format": 1.0}),))


def test_group_metrics_by_hand():
    groups = [
        TrajectoryGroup((_traj(1, 2), _traj(0, 4))),  # mixed
        TrajectoryGroup((_traj(1, 2), _traj(1, 2))),  # all good
        TrajectoryGroup((_traj(0, 8, "length"), _traj(0, 4))),  # all bad, one truncated
    ]
    m = group_metrics(groups, prefix="test/")
    assert m["test/env/all/correct"] == pytest.approx(3 / 6)
    assert m["test/env/all/reward/total"] == pytest.approx(3 / 6)
    assert m["test/env/all/ac_tokens_per_turn"] == pytest.approx(22 / 6)
    assert m["test/env/all/frac_truncated"] == pytest.approx(1 / 6)
    for outcome in ("mixed", "all_good", "all_bad"):
        assert m[f"test/env/all/by_group/frac_{outcome}"] == pytest.approx(1 / 3)
