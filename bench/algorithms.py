"""The policy losses and DAPO's options compared by measurement: the main job's configuration with
each, several seeds, in one run; the same on a harder setting.

    .venv/bin/python bench/algorithms.py                          # every config x 3 seeds x 2 settings
    .venv/bin/python bench/algorithms.py --settings main --configs is,cispo --seeds 0
    .venv/bin/python bench/algorithms.py --set max_steps=2 --seeds 0  # shakes out the plumbing

Each run is its own ``mathrl train`` process with the main job's defaults plus the config's keys
(CONFIGS) plus the setting's (SETTINGS) plus ``--set``, ``seed=S`` and ``num_threads`` = cores /
``--jobs``; ``--jobs`` runs go at once, so wall times compare within one bench run, not with the
main job's own (which has both cores). A run directory that finished (its metrics hold the final
evaluation) is read, not rerun: a bench stopped half-way resumes where it stopped; an unfinished
one is started again from scratch (its wall time would be wrong otherwise).

Per config and setting, over seeds: held-out greedy accuracy (``test/env/all/correct``, 200
problems) at each evaluated step, mean and the seeds' values, the final 95% CIs (Wilson, per
seed); wall time; mean ``optim/kl_sample_train_v1`` and ``optim/entropy`` over the steps; mean
sequences trained per step; extra batches drawn by dynamic sampling. Wall time depends on what else
the machine does; CPU-seconds (the run's process tree, from wait4) much less: both are shown. Writes ``--out``/table.md,
``--out``/results.json and ``--out``/curves.png (held-out accuracy per config, mean over seeds
with the seeds' range shaded), and prints the ``mathrl report`` command that overlays the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mathrl.tracking import read_jsonl  # noqa: E402

# What each config changes on top of the main job's defaults (importance_sampling, token_mean).
CONFIGS: dict[str, dict[str, str]] = {
    "is": {},
    "ppo": {"loss_fn": "ppo"},
    "cispo": {"loss_fn": "cispo"},
    "gspo": {"loss_fn": "gspo", "loss_agg": "seq_mean"},
    "dr_grpo": {"loss_agg": "token_sum_norm"},
    "clip_higher": {"loss_fn": "ppo", "ppo_clip_high": "0.28"},
    "dynamic": {"dynamic_sampling": "true"},
    "overlong": {"overlong_filter": "true", "overlong_buffer": "4"},
    "dapo": {
        "loss_fn": "ppo",
        "ppo_clip_high": "0.28",
        "dynamic_sampling": "true",
        "overlong_filter": "true",
        "overlong_buffer": "4",
    },
}
SETTINGS: dict[str, dict[str, str]] = {
    "main": {},
    # Two-digit sums: the model starts near 5% and the main job's budget does not saturate it.
    "hard": {"env_args.max_operand": "99"},
}
NCPU = len(os.sched_getaffinity(0))


def run_dir(out: Path, setting: str, config: str, seed: int) -> Path:
    return out / "runs" / f"{setting}-{config}-s{seed}"


def finished(rows: list[dict[str, Any]], max_steps: int) -> bool:
    return any(r.get("step") == max_steps and "test/env/all/correct" in r for r in rows)


def train(
    out: Path, setting: str, config: str, seed: int, extra: dict[str, str], threads: int, log: Any
) -> dict[str, Any]:
    """One ``mathrl train`` run (or the finished one already on disk): its rows, wall time, RSS."""
    path = run_dir(out, setting, config, seed)
    keys = {**CONFIGS[config], **SETTINGS[setting], **extra, "seed": str(seed), "num_threads": str(threads)}
    max_steps = int(keys.get("max_steps", 30))
    done_file = path / "bench.json"
    if done_file.exists() and finished(read_jsonl(path / "metrics.jsonl"), max_steps):
        log(f"{path.name}: done before, read")
        return {**json.loads(done_file.read_text()), "rows": read_jsonl(path / "metrics.jsonl")}
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    argv = [sys.executable, "-m", "mathrl", "train", f"log_path={path}", "save_rollouts=false"]
    argv += [f"{k}={v}" for k, v in keys.items()]
    log(f"{path.name}: {' '.join(argv[3:])}")
    t0 = time.monotonic()
    with open(path / "train.log", "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    rows = read_jsonl(path / "metrics.jsonl")
    if os.waitstatus_to_exitcode(status) != 0 or not finished(rows, max_steps):
        tail = (path / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise SystemExit(f"{path.name}: mathrl train failed ({tail[0] if tail else 'no output'}); see {path}/train.log")
    cpu = usage.ru_utime + usage.ru_stime
    info = {"keys": keys, "wall_s": wall, "cpu_s": cpu, "max_rss_gb": usage.ru_maxrss / 2**20, "threads": threads}
    done_file.write_text(json.dumps(info))
    log(f"{path.name}: {wall:.0f} s, final {rows[-1]['test/env/all/correct']:.3f}")
    return {**info, "rows": rows}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one config over its seeds."""
    tests = [{r["step"]: r for r in run["rows"] if "test/env/all/correct" in r} for run in runs]
    steps = sorted(set.intersection(*(set(t) for t in tests)))

    def step_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for r in run["rows"] if "optim/loss" in r]

    def mean_of(key: str) -> float:
        return statistics.fmean(statistics.fmean(r[key] for r in step_rows(run) if key in r) for run in runs)

    final = [t[steps[-1]] for t in tests]
    return {
        "steps": steps,
        "acc": {s: [t[s]["test/env/all/correct"] for t in tests] for s in steps},
        "final_ci": [(r.get("test/pass@1/ci_low"), r.get("test/pass@1/ci_high")) for r in final],
        "wall_s": statistics.fmean(run["wall_s"] for run in runs),
        "cpu_s": statistics.fmean(run["cpu_s"] for run in runs),
        "kl_v1": mean_of("optim/kl_sample_train_v1"),
        "entropy": mean_of("optim/entropy"),
        "sequences": mean_of("optim/num_sequences"),
        "extra_draws": sum(sum(r.get("dynamic_sampling/extra_draws", 0) for r in run["rows"]) for run in runs)
        / len(runs),
        "train_curve": [[(r["step"], r["env/all/correct"]) for r in step_rows(run)] for run in runs],
        "test_curve": [[(s, t[s]["test/env/all/correct"]) for s in steps] for t in tests],
    }


def table(results: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> str:
    lines = []
    for setting, configs in results.items():
        steps = next(iter(configs.values()))["steps"]
        lines += [
            f"**{setting}** ({' '.join(f'{k}={v}' for k, v in SETTINGS[setting].items()) or 'the main job'}), "
            f"seeds {','.join(map(str, seeds))}: held-out greedy accuracy, mean of seeds (each seed)",
            "",
            "| config | "
            + " | ".join(f"step {s}" for s in steps)
            + " | final 95% CIs | wall s | CPU s | KL v1 | entropy | seqs/step | extra draws |",
            "|---|" + "---|" * (len(steps) + 7),
        ]
        for name, s in configs.items():
            accs = [
                f"**{statistics.fmean(s['acc'][st]):.3f}** ({' '.join(f'{a:.3f}' for a in s['acc'][st])})"
                for st in steps
            ]
            cis = " ".join(f"[{lo:.2f},{hi:.2f}]" for lo, hi in s["final_ci"] if lo is not None)
            lines.append(
                f"| {name} | " + " | ".join(accs) + f" | {cis} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | "
                f"{s['kl_v1']:.4f} | {s['entropy']:.3f} | {s['sequences']:.0f} | {s['extra_draws']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (setting, configs) in zip(axes[0], results.items(), strict=True):
        for name, s in configs.items():
            steps = s["steps"]
            per_seed = [[a for _, a in curve] for curve in s["test_curve"]]
            mean = [statistics.fmean(v) for v in zip(*per_seed, strict=True)]
            (line,) = ax.plot(steps, mean, "o-", label=name, lw=1.5, ms=3)
            ax.fill_between(
                steps,
                [min(v) for v in zip(*per_seed, strict=True)],
                [max(v) for v in zip(*per_seed, strict=True)],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set_title(f"{setting}: held-out accuracy (greedy), mean of seeds, range shaded")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/jobs threads)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra mathrl train key, all runs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-algorithms")
    p.add_argument("--plot", type=Path, help="also copy the curves PNG here (e.g. docs/algorithms_curves.png)")
    a = p.parse_args()
    configs, settings = a.configs.split(","), a.settings.split(",")
    for name, known in (*((c, CONFIGS) for c in configs), *((s, SETTINGS) for s in settings)):
        if name not in known:
            p.error(f"unknown {name!r}; choose from {', '.join(known)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    extra = dict(kv.split("=", 1) for kv in a.set)
    a.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, NCPU // a.jobs)

    def log(msg: str) -> None:
        print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    log(f"commit {git.stdout.strip()}, {NCPU} cores, {a.jobs} runs at once x {threads} threads")
    jobs = [(st, c, s) for st in settings for s in seeds for c in configs]
    with ThreadPoolExecutor(a.jobs) as pool:
        done = list(pool.map(lambda j: train(a.out, *j, extra, threads, log), jobs))
    runs = dict(zip(jobs, done, strict=True))
    results = {st: {c: summarize([runs[st, c, s] for s in seeds]) for c in configs} for st in settings}
    text = table(results, seeds)
    (a.out / "table.md").write_text(text)
    raw = {st: {c: [runs[st, c, s] for s in seeds] for c in configs} for st in settings}
    (a.out / "results.json").write_text(json.dumps({"commit": git.stdout.strip(), "runs": raw}, default=str))
    plot(results, a.out / "curves.png")
    if a.plot:
        shutil.copy(a.out / "curves.png", a.plot)
    print(text)
    dirs = ",".join(str(run_dir(a.out, settings[0], c, seeds[0])) for c in configs)
    print(f"curves: {a.out / 'curves.png'}\noverlay: .venv/bin/mathrl report runs={dirs} labels={','.join(configs)}")


if __name__ == "__main__":
    main()
