"""Summary metrics of sampled trajectory groups, with tinker-cookbook's key names.

An env's per-turn metrics are summed over an episode when their key starts with ``num_``
(tool calls, tool errors by kind, lost sessions) and taken from its last turn otherwise
(``correct``, ``format``); both are then averaged over episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

from mathrl.types import Trajectory, TrajectoryGroup


def _final_metric(traj: Trajectory, key: str) -> float | None:
    values = [t.metrics[key] for t in traj.transitions if key in t.metrics]
    return values[-1] if values else None


def _succeeded(traj: Trajectory) -> bool:
    """Correct when the env reports correctness, else a positive reward."""
    correct = _final_metric(traj, "correct")
    return correct > 0 if correct is not None else traj.total_reward > 0


def group_metrics(groups: Sequence[TrajectoryGroup], prefix: str = "") -> dict[str, float]:
    """env/all/... metrics: reward, correct, format, tokens, truncation, grader timeouts and group
    outcome fractions."""
    trajs = [t for g in groups for t in g.trajectories_G]
    transitions = [tr for t in trajs for tr in t.transitions]
    if not trajs:
        return {}
    out: dict[str, float] = {
        "env/all/reward/total": fmean(t.total_reward for t in trajs),
        "env/all/ac_tokens_per_turn": fmean(len(tr.ac.tokens_T) for tr in transitions),
        "env/all/turns_per_episode": fmean(len(t.transitions) for t in trajs),
        "env/all/frac_truncated": fmean(tr.ac.finish_reason == "length" for tr in transitions),
    }
    for key in ("correct", "format"):
        values = [v for t in trajs if (v := _final_metric(t, key)) is not None]
        if values:
            out[f"env/all/{key}"] = fmean(values)
    counted = sorted({k for tr in transitions for k in tr.metrics if k.startswith("num_")})
    if counted:  # multi-turn envs: turns, tool calls, errors by kind, sessions lost
        out["env/all/num_turns"] = out["env/all/turns_per_episode"]
        for key in counted:
            out[f"env/all/{key}"] = fmean(sum(tr.metrics.get(key, 0.0) for tr in t.transitions) for t in trajs)
        if "num_state_lost" in counted:
            lost = [any(tr.metrics.get("num_state_lost", 0) for tr in t.transitions) for t in trajs]
            out["env/all/frac_state_lost"] = fmean(lost)
    timeouts = [tr.metrics["grader_timeout"] for tr in transitions if "grader_timeout" in tr.metrics]
    if timeouts:  # comparisons that ran out of time (graded wrong): should stay 0
        out["env/all/grader_timeouts"] = sum(timeouts)
    outcomes = {"mixed": 0, "all_good": 0, "all_bad": 0}
    for g in groups:
        good = [_succeeded(t) for t in g.trajectories_G]
        outcomes["all_good" if all(good) else "all_bad" if not any(good) else "mixed"] += 1
    for name, count in outcomes.items():
        out[f"env/all/by_group/frac_{name}"] = count / len(groups)
    return {prefix + k: v for k, v in out.items()}
