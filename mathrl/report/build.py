"""Read a run directory into plain data for the report: config, metric rows, checkpoints,
evaluation tables, and the sample browser's groups.

What a directory is, by what it holds (``config.json`` says which command wrote it):

- ``mathrl train``: metrics.jsonl, checkpoints.jsonl, ``rollouts/step_N.jsonl`` (one row per
  turn of each episode: group, turn, reward, advantage, prompt, completion, answer, reference,
  tool calls) when ``save_rollouts``, and ``eval/step_N.jsonl`` (one row per test problem);
- ``mathrl sft``: metrics.jsonl (train and held-out NLL) and checkpoints.jsonl;
- ``mathrl eval``: ``<model>/<benchmark>.jsonl`` rows and ``.summary.json`` figures;
- ``mathrl distill``: the same rows per teacher and dataset, and ``yield.json``.

The browser shows, per step, a few groups picked at evenly spaced quantiles of their mean
reward (lowest to highest, as tinker-cookbook's ``_select_representative_inds`` picks the
groups it logs), so a page shows the failures and the successes of a step, not only the first
problems. Everything shown is capped (steps, groups, completions, characters: ReportConfig),
which bounds the page's size however long the run; the page states the caps.

Pure Python (json, pathlib): writing a report inside a training run costs no import.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathrl.config import ConfigError
from mathrl.report.config import ReportConfig
from mathrl.tracking import read_jsonl

# --- the data a page shows ---------------------------------------------------------------------


@dataclass
class ToolCall:
    code: str
    output: str
    error: str | None
    seconds: float | None
    state_lost: bool


@dataclass
class Turn:
    """One assistant reply of an episode and the tool calls it made (none: the final reply)."""

    text: str
    finish_reason: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)


@dataclass
class Completion:
    """One sample (single-turn) or episode (multi-turn: ``turns``), as graded and trained."""

    text: str
    reward: float | None
    advantage: float | None
    answer: str | None
    reference: str
    correct: bool | None
    truncated: bool
    turns: list[Turn] = field(default_factory=list)
    trained: bool = False  # a training rollout (its advantage None: its group was left out of the update)


@dataclass
class Group:
    """The completions of one prompt (a training group, or a test problem's samples)."""

    title: str
    prompt: str
    reference: str
    mean_reward: float
    completions: list[Completion]
    total: int  # completions in the group, before the cap


@dataclass
class View:
    """What the browser shows for one step (or one model and benchmark)."""

    key: str
    name: str
    groups: list[Group]
    total: int  # groups at that step, before picking


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class RunData:
    label: str
    path: str
    kind: str  # train, sft, eval, distill
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # metrics.jsonl
    checkpoints: list[dict[str, Any]]
    tables: list[Table]
    views: list[View]
    notes: list[str]
    headline: str = "-"  # the run's result in one line: final test accuracy, held-out NLL, pass@1s, yield


@dataclass
class Series:
    """One curve: (step, value) per logged value, None where the value was not finite (a gap)."""

    run: str
    key: str
    label: str
    points: list[tuple[float, float | None]]


@dataclass
class Band:
    """A confidence band: the interval (low, high) logged at each step."""

    run: str
    key: str
    points: list[tuple[float, float, float]]


@dataclass
class Chart:
    title: str
    series: list[Series]
    bands: list[Band]


# --- reading a run -----------------------------------------------------------------------------


def read_run(path: Path, label: str, cfg: ReportConfig) -> RunData:
    """Everything the page shows of one run directory; ConfigError names what is missing."""
    if not path.is_dir():
        raise ConfigError(f"runs: {path} is not a directory; pass a run directory (its log_path or output_dir)")
    config = _read_json(path / "config.json", {})
    kind = run_kind(path, config)
    reader = {"train": _train_run, "sft": _sft_run, "eval": _eval_run, "distill": _distill_run}[kind]
    return reader(path, label, kind, config, cfg)


def run_kind(path: Path, config: dict[str, Any]) -> str:
    """train, sft, eval or distill: by the config's keys, else by the files present."""
    if "train_file" in config:
        return "sft"
    if "benchmarks" in config or list(path.glob("*/*.summary.json")):
        return "eval"
    if "datasets" in config or (path / "yield.json").exists():
        return "distill"
    if (path / "metrics.jsonl").exists():
        return "train"
    raise ConfigError(
        f"runs: {path} is not a run directory: it has no metrics.jsonl (mathrl train/sft), "
        "<model>/<benchmark>.summary.json (mathrl eval) or yield.json (mathrl distill)"
    )


def _train_run(path: Path, label: str, kind: str, config: dict[str, Any], cfg: ReportConfig) -> RunData:
    rows = read_jsonl(path / "metrics.jsonl")
    notes = []
    train_steps = _steps(path / "rollouts")
    test_steps = _steps(path / "eval")
    shown_train, shown_test = spaced(train_steps, cfg.sample_steps), spaced(test_steps, cfg.sample_steps)
    views = [
        *(_view(f"train-{s}", f"step {s}: training groups", rollout_groups(read_jsonl(p)), cfg)
          for s, p in shown_train),
        *(_view(f"test-{s}", f"step {s}: test problems", [eval_group(r) for r in read_jsonl(p)], cfg)
          for s, p in shown_test),
    ]  # fmt: skip
    views.sort(key=lambda v: (int(v.key.split("-")[1]), v.key != f"train-{v.key.split('-')[1]}"))
    if not train_steps:
        notes.append("training rollouts were not saved (save_rollouts=false): the browser shows test problems only")
    for what, steps, shown in (("rollouts", train_steps, shown_train), ("test evaluations", test_steps, shown_test)):
        if len(shown) < len(steps):
            notes.append(f"{what}: {len(shown)} of {len(steps)} steps shown (evenly spaced, the last kept)")
    tables = [t for t in [evaluation_table(rows)] if t.rows]
    last = next((r for r in reversed(rows) if "test/env/all/correct" in r), None)
    headline = f"test pass@1 {_test_ci(last)} % at step {last['step']}" if last else "-"
    return RunData(label, str(path), kind, config, rows, _checkpoints(path), tables, views, notes, headline)


def _sft_run(path: Path, label: str, kind: str, config: dict[str, Any], cfg: ReportConfig) -> RunData:
    rows = read_jsonl(path / "metrics.jsonl")
    table = Table(
        "Held-out NLL per token",
        ["step", "held-out NLL", "train NLL"],
        [[str(r["step"]), _num(r["test/nll"], 4), _num(r.get("train_mean_nll"), 4)] for r in rows if "test/nll" in r],
    )
    last = next((r for r in reversed(rows) if "test/nll" in r), None)
    headline = f"held-out NLL {last['test/nll']:.4f} at step {last['step']}" if last else "-"
    return RunData(label, str(path), kind, config, rows, _checkpoints(path), [table] if table.rows else [], [], [],
                   headline)  # fmt: skip


def _eval_run(path: Path, label: str, kind: str, config: dict[str, Any], cfg: ReportConfig) -> RunData:
    summaries = [_read_json(p, {}) | {"folder": p.parent.name} for p in sorted(path.glob("*/*.summary.json"))]
    views = _folder_views(path, cfg)
    headline = "; ".join(
        f"{s.get('model') or s['folder']} / {s.get('benchmark')}: pass@1 {_summary_ci(s)} %" for s in summaries
    )
    return RunData(label, str(path), kind, config, [], [], [summary_table(summaries)], views, [], headline or "-")


def _distill_run(path: Path, label: str, kind: str, config: dict[str, Any], cfg: ReportConfig) -> RunData:
    report = _read_json(path / "yield.json", [])
    columns = list(report[0]) if report else []
    table = Table(
        "Yield",
        columns,
        [[f"{_pct(r[c])}%" if c in ("yield", "truncated") else str(r[c]) for c in columns] for r in report],
        "yield = correct samples / samples; solved = problems with a correct sample; traces = samples kept",
    )
    traces = path / "traces.jsonl"
    notes = [f"traces: {traces} ({sum(1 for _ in traces.open())} lines)"] if traces.exists() else []
    alls = [r for r in report if r.get("group") == "all" and r.get("dataset") != "all datasets"]  # one per dataset
    n_samples, n_traces = (sum(int(r.get(k) or 0) for r in alls) for k in ("samples", "traces"))
    headline = f"{n_traces} traces from {n_samples} samples"
    return RunData(label, str(path), kind, config, [], [], [table], _folder_views(path, cfg), notes, headline)


def _folder_views(path: Path, cfg: ReportConfig) -> list[View]:
    """One view per ``<model>/<dataset>.jsonl`` of an eval or distill output directory."""
    return [
        _view(f"{p.parent.name}/{p.stem}", f"{p.parent.name} / {p.stem}", [eval_group(r) for r in read_jsonl(p)], cfg)
        for p in sorted(path.glob("*/*.jsonl"))
    ]


def _checkpoints(path: Path) -> list[dict[str, Any]]:
    return [
        {"step": c.get("step"), "path": c.get("path", ""), "final": bool(c.get("final")),
         "exists": (path / str(c.get("path", ""))).is_dir()}
        for c in read_jsonl(path / "checkpoints.jsonl")
    ]  # fmt: skip


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None


def _steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, file) of ``step_N.jsonl`` files, by step."""
    found = [
        (int(m.group(1)), p) for p in folder.glob("step_*.jsonl") if (m := re.fullmatch(r"step_(\d+)\.jsonl", p.name))
    ]
    return sorted(found)


def spaced(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` of ``items``, evenly spaced, the first and the last always among them."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def pick_by_quantile(scores: Sequence[float], k: int) -> list[int]:
    """Indices of ``k`` items at evenly spaced quantiles of ``scores``, lowest score first:
    tinker-cookbook's ``_select_representative_inds`` (sorted order, ``linspace(0, n-1, k)``
    floored), with ties kept in their original order and repeats dropped."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    k = min(k, len(order))
    if k <= 1:
        return order[:k]
    picks = [order[int(j * (len(order) - 1) / (k - 1))] for j in range(k)]
    return list(dict.fromkeys(picks))


def cut(text: str, limit: int) -> str:
    """``text`` whole, or its head and tail with the number of characters left out between them
    (a completion's answer and a prompt's question are at their ends)."""
    if len(text) <= limit:
        return text
    head = limit // 3
    tail = limit - head
    return f"{text[:head]}\n… [{len(text) - limit} characters cut] …\n{text[-tail:]}"


def _view(key: str, name: str, groups: list[Group], cfg: ReportConfig) -> View:
    """The picked groups, each with at most ``completions_per_group`` completions (picked by
    reward quantile too, shown in their original order) and every text cut to ``max_chars``."""
    picked = [groups[i] for i in pick_by_quantile([g.mean_reward for g in groups], cfg.groups_per_step)]
    for g in picked:
        rewards = [c.reward if c.reward is not None else 0.0 for c in g.completions]
        keep = sorted(pick_by_quantile(rewards, cfg.completions_per_group))
        g.completions = [_cut_completion(g.completions[i], cfg.max_chars) for i in keep]
        g.prompt = cut(g.prompt, cfg.max_chars)
    return View(key, name, picked, len(groups))


def _cut_completion(c: Completion, limit: int) -> Completion:
    turns = [
        Turn(cut(t.text, limit), t.finish_reason,
             [ToolCall(cut(k.code, limit), cut(k.output, limit), k.error, k.seconds, k.state_lost)
              for k in t.tool_calls],
             [cut(e, limit) for e in t.parse_errors])
        for t in c.turns
    ]  # fmt: skip
    return Completion(
        cut(c.text, limit), c.reward, c.advantage, c.answer, c.reference, c.correct, c.truncated, turns, c.trained
    )


# --- rows -> groups ----------------------------------------------------------------------------


def rollout_groups(rows: Sequence[dict[str, Any]]) -> list[Group]:
    """A step's rollout rows (one per turn; an episode's turns consecutive, from turn 0) as groups."""
    episodes_by_group: dict[int, list[list[dict[str, Any]]]] = {}
    for row in rows:
        episodes = episodes_by_group.setdefault(int(row.get("group", 0)), [])
        if not episodes or int(row.get("turn", 0)) == 0:
            episodes.append([])
        episodes[-1].append(row)
    groups = []
    for g, episodes in episodes_by_group.items():
        completions = [_episode(turns) for turns in episodes]
        rewards = [c.reward for c in completions if c.reward is not None]
        groups.append(
            Group(f"group {g}", str(episodes[0][0].get("prompt", "")), completions[0].reference,
                  sum(rewards) / len(rewards) if rewards else 0.0, completions, len(completions))
        )  # fmt: skip
    return groups


def _episode(turns: Sequence[dict[str, Any]]) -> Completion:
    last = turns[-1]
    reward = last.get("total_reward", sum(_float(t.get("reward")) or 0.0 for t in turns))
    return Completion(
        text=str(last.get("completion", "")),
        reward=_float(reward),
        advantage=_float(turns[0].get("advantage")),
        answer=_str(last.get("answer")),
        reference=str(last.get("reference") or ""),
        correct=bool(last["correct"]) if last.get("correct") is not None else None,
        truncated=last.get("finish_reason") == "length",
        turns=[_turn(t.get("completion", ""), t) for t in turns],
        trained=True,
    )


def eval_group(row: dict[str, Any]) -> Group:
    """A row of ``mathrl eval``/``distill``/a training run's test set: one problem and its samples."""
    completions = [
        Completion(
            text=str(s.get("text", "")),
            reward=_float(s.get("reward", float(bool(s.get("correct"))))),
            advantage=None,
            answer=_str(s.get("answer")),
            reference=str(row.get("reference", "")),
            correct=bool(s.get("correct")),
            truncated=s.get("finish_reason") == "length",
            turns=[_turn(t.get("text", ""), t) for t in s.get("turns", [s])],
        )
        for s in row.get("samples", [])
    ]
    rewards = [c.reward or 0.0 for c in completions]
    prompt = "\n\n".join(f"[{m.get('role')}] {m.get('content')}" for m in row.get("prompt") or [])
    return Group(f"problem {row.get('id', '?')}", prompt, str(row.get("reference", "")),
                 sum(rewards) / max(len(rewards), 1), completions, len(completions))  # fmt: skip


def _turn(text: Any, row: dict[str, Any]) -> Turn:
    calls = [
        ToolCall(str(c.get("code", "")), str(c.get("output", "")), c.get("error"), _float(c.get("duration_s")),
                 bool(c.get("state_lost")))
        for c in row.get("tool_calls") or []
    ]  # fmt: skip
    return Turn(str(text), str(row.get("finish_reason", "")), calls, [str(e) for e in row.get("parse_errors") or []])


def _float(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _str(x: Any) -> str | None:
    return None if x is None else str(x)


# --- tables ------------------------------------------------------------------------------------


def _pct(x: Any) -> str:
    v = _float(x)
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _num(x: Any, digits: int = 2) -> str:
    v = _float(x)
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(value: Any, low: Any, high: Any) -> str:
    """``6.2 [1.1, 28.3]``: a rate and its 95% interval, in percent."""
    return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]" if low is not None else _pct(value)


def _test_ci(r: dict[str, Any]) -> str:
    return _ci(r["test/env/all/correct"], r.get("test/pass@1/ci_low"), r.get("test/pass@1/ci_high"))


def _summary_ci(s: dict[str, Any]) -> str:
    return _ci(s.get("pass1"), s.get("pass1_low"), s.get("pass1_high"))


_TOOL_COLUMNS = (("turns", "num_turns"), ("tool calls", "num_tool_calls"), ("tool errors", "num_tool_errors"))


def evaluation_table(rows: Sequence[dict[str, Any]]) -> Table:
    """The test evaluations of a training run, one row per evaluated step, rates in percent."""
    evals = [r for r in rows if "test/env/all/correct" in r]
    ks = sorted({int(m.group(2)) for r in evals for key in r if (m := re.fullmatch(r"test/(pass|maj)@(\d+)", key))})
    tools = any("test/env/all/num_turns" in r for r in evals)
    columns = ["step", "pass@1 [95% CI]", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks),
               "mean tokens", "truncated", "no answer"]  # fmt: skip
    if tools:
        columns += [name for name, _ in _TOOL_COLUMNS] + ["valid calls"]
    out = []
    for r in evals:
        cells = [str(r["step"]), _test_ci(r)]
        cells += [_pct(r.get(f"test/pass@{k}")) for k in ks] + [_pct(r.get(f"test/maj@{k}")) for k in ks]
        cells += [_num(r.get("test/env/all/ac_tokens_per_turn"), 1), _pct(r.get("test/env/all/frac_truncated")),
                  _pct(r.get("test/env/all/frac_no_answer"))]  # fmt: skip
        if tools:
            cells += [_num(r.get(f"test/env/all/{key}")) for _, key in _TOOL_COLUMNS]
            cells.append(_pct(r.get("test/env/all/valid_call_rate")))
        out.append(cells)
    return Table(
        "Test evaluations", columns, out, "rates in %; pass@1 with its 95% interval (Wilson, design-effect corrected)"
    )


def summary_table(summaries: Sequence[dict[str, Any]]) -> Table:
    """``mathrl eval``'s per model and benchmark figures (its .summary.json files)."""
    tools = any(s.get("tools") for s in summaries)
    columns = ["model", "benchmark", "problems", "n", "pass@1 [95% CI]", "pass@k", "maj@k", "mean tokens",
               "truncated", "no answer"]  # fmt: skip
    if tools:
        columns += ["turns", "tool calls", "tool errors", "valid calls"]
    rows = []
    for s in summaries:
        cells = [
            str(s.get("model") or s["folder"]), str(s.get("benchmark", "")), str(s.get("problems", "")),
            str(s.get("samples_per_problem", "")), _summary_ci(s),
            ", ".join(f"@{k} {_pct(v)}" for k, v in (s.get("pass_at") or {}).items()),
            ", ".join(f"@{k} {_pct(v)}" for k, v in (s.get("maj_at") or {}).items()),
            _num(s.get("mean_tokens"), 1), _pct(s.get("truncation_rate")), _pct(s.get("no_answer_rate")),
        ]  # fmt: skip
        if tools:
            t = s.get("tools") or {}
            cells += [_num(t.get("mean_turns")), _num(t.get("mean_tool_calls")), _num(t.get("mean_tool_errors")),
                      _pct(t.get("valid_call_rate"))]  # fmt: skip
        rows.append(cells)
    return Table(
        "Benchmarks", columns, rows, "rates in %; pass@1 with its 95% interval (Wilson, design-effect corrected)"
    )


# --- curves ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChartSpec:
    """A chart: fixed (key, label) pairs and/or every key matching ``pattern``; ``bands`` maps
    a key to the (low, high) keys of its interval."""

    title: str
    keys: tuple[tuple[str, str], ...] = ()
    pattern: str = ""
    bands: tuple[tuple[str, str, str], ...] = ()


CHARTS = (
    ChartSpec("Reward and accuracy",
              (("env/all/reward/total", "train reward"), ("env/all/correct", "train correct"),
               ("test/env/all/correct", "test pass@1")),
              bands=(("test/env/all/correct", "test/pass@1/ci_low", "test/pass@1/ci_high"),)),
    ChartSpec("Test pass@k and maj@k", pattern=r"test/(pass|maj)@\d+"),
    ChartSpec("NLL per token", (("train_mean_nll", "train NLL"), ("test/nll", "held-out NLL"))),
    ChartSpec("Entropy", (("optim/entropy", "entropy"),)),
    ChartSpec("KL", (("optim/kl_sample_train_v1", "sampler/trainer v1"), ("optim/kl_sample_train_v2",
                     "sampler/trainer v2"), ("optim/kl_ref", "to the starting weights"))),
    ChartSpec("Learning rate", (("optim/lr", "lr"),)),
    ChartSpec("Step time (s)", (("time/sample", "sample"), ("time/train", "train"), ("time/eval", "eval"),
                                ("time/step", "whole step"))),
    ChartSpec("Tokens per turn", (("env/all/ac_tokens_per_turn", "train"),
                                  ("test/env/all/ac_tokens_per_turn", "test"))),
    ChartSpec("Truncated and no answer", (("env/all/frac_truncated", "train truncated"),
              ("test/env/all/frac_truncated", "test truncated"), ("test/env/all/frac_no_answer", "test no answer"))),
    ChartSpec("Tool use per episode", (("env/all/num_turns", "train turns"), ("env/all/num_tool_calls", "train calls"),
              ("env/all/num_tool_errors", "train errors"), ("test/env/all/num_turns", "test turns"),
              ("test/env/all/num_tool_calls", "test calls"), ("test/env/all/num_tool_errors", "test errors"),
              ("test/env/all/valid_call_rate", "test valid-call rate"), ("env/all/frac_state_lost", "state lost"))),
    ChartSpec("Tool errors by kind", pattern=r"env/all/num_tool_errors/.+"),
    ChartSpec("Groups", pattern=r"env/all/by_group/.+"),
    ChartSpec("Update", (("optim/loss", "loss"), ("optim/grad_norm", "grad norm"), ("optim/ratio_mean", "ratio mean"),
              ("optim/advantage_abs_mean", "|advantage| mean"),
              ("optim/frac_ratio_outside_clip", "ratio outside clip"))),
)  # fmt: skip
_NOT_CHARTED = {"step", "progress/batch", "progress/epoch"}


def charts(runs: Sequence[RunData], specs: Sequence[ChartSpec] = CHARTS) -> tuple[list[Chart], list[Chart]]:
    """(main charts, one chart per remaining numeric key): every run's series of each chart,
    charts with no logged value left out."""
    keys = list(dict.fromkeys(k for run in runs for row in run.rows for k, v in row.items() if _is_number(v)))
    used = set(_NOT_CHARTED)
    main = []
    for spec in specs:
        matched = [k for k in keys if spec.pattern and re.fullmatch(spec.pattern, k)]
        pairs = list(spec.keys) + [(k, k.rsplit("/", 1)[-1]) for k in matched]  # by_group/frac_mixed -> frac_mixed
        chart = _chart(spec.title, pairs, spec.bands, runs)
        used |= {k for k, _ in pairs} | {b for _, lo, hi in spec.bands for b in (lo, hi)}
        if chart.series:
            main.append(chart)
    other = [_chart(k, [(k, k)], (), runs) for k in keys if k not in used]
    return main, [c for c in other if c.series]


def _chart(
    title: str, pairs: Sequence[tuple[str, str]], bands: Sequence[tuple[str, str, str]], runs: Sequence[RunData]
) -> Chart:
    series, drawn_bands = [], []
    for run in runs:
        for key, label in pairs:
            points = [(float(r["step"]), _finite(r[key])) for r in run.rows if key in r and _is_number(r[key])]
            if points:
                series.append(Series(run.label, key, label, points))
        for key, lo, hi in bands:
            interval = [(float(r["step"]), float(r[lo]), float(r[hi])) for r in run.rows
                        if key in r and _finite_number(r.get(lo)) and _finite_number(r.get(hi))]  # fmt: skip
            if interval:
                drawn_bands.append(Band(run.label, key, interval))
    return Chart(title, series, drawn_bands)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite_number(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
