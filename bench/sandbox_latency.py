"""Sandbox latency: mathrl's bubblewrap sessions and rlimit fallback vs a plain subprocess per call.

The peer is what a tool call costs with no isolation and no state (an early verifiers
version ran each call as ``python -c`` in a subprocess): one interpreter per call. For
each system, in one run:

- start: a new session (or subprocess) up to the answer of its first ``print(1)``;
- round trip: ``print(1)`` on a warm session (for the peer, the same as start);
- 64 at once: 64 ``print(i)`` cells on 64 warm sessions from 64 threads (``run_many``),
  and 64 fresh sessions started and run at once (the start of a rollout step);
- import sympy: the first ``import sympy`` in a fresh session.

Run: ``.venv/bin/python bench/sandbox_latency.py [--repeats 50]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table

from mathrl.sandbox import Sandbox, run_many


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"{1000 * statistics.median(values):.1f} / {1000 * p95:.1f}"


def bench_backend(backend: str, repeats: int) -> dict[str, str]:
    starts = []
    for _ in range(repeats):
        begin = time.perf_counter()
        with Sandbox(backend=backend) as sb:
            assert sb.run("print(1)").output == "1\n"
        starts.append(time.perf_counter() - begin)
    with Sandbox(backend=backend) as sb:
        sb.run("0")
        trips = []
        for _ in range(repeats * 4):
            begin = time.perf_counter()
            sb.run("print(1)")
            trips.append(time.perf_counter() - begin)
        isolation = sb.isolation
    warm = [Sandbox(backend=backend) for _ in range(64)]
    try:
        run_many([(sb, "0") for sb in warm])
        begin = time.perf_counter()
        results = run_many([(sb, f"print({i})") for i, sb in enumerate(warm)])
        concurrent = time.perf_counter() - begin
        assert [r.output for r in results] == [f"{i}\n" for i in range(64)]
    finally:
        for sb in warm:
            sb.close()
    cold = [Sandbox(backend=backend) for _ in range(64)]
    try:
        begin = time.perf_counter()
        run_many([(sb, "print(1)") for sb in cold])
        cold_wall = time.perf_counter() - begin
    finally:
        for sb in cold:
            sb.close()
    with Sandbox(backend=backend) as sb:
        sb.run("0")
        sympy = sb.run("import sympy").duration_s
    return {
        "system": f"mathrl {backend} ({isolation})",
        "start": _ms(starts),
        "trip": _ms(trips),
        "warm64": f"{1000 * concurrent:.0f}",
        "cold64": f"{1000 * cold_wall:.0f}",
        "sympy": f"{sympy:.2f}",
    }


def bench_subprocess(repeats: int) -> dict[str, str]:
    def call(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout

    calls = []
    for _ in range(repeats * 4):
        begin = time.perf_counter()
        assert call("print(1)") == "1\n"
        calls.append(time.perf_counter() - begin)
    concurrent = _wall(lambda: _many(call, 64))
    begin = time.perf_counter()
    call("import sympy")
    sympy = time.perf_counter() - begin
    return {
        "system": "python -c per call (no isolation, no state)",
        "start": _ms(calls),
        "trip": _ms(calls),
        "warm64": f"{1000 * concurrent:.0f}",
        "cold64": f"{1000 * concurrent:.0f}",
        "sympy": f"{sympy:.2f}",
    }


def _many(call: Callable[[str], str], n: int) -> None:
    with ThreadPoolExecutor(max_workers=n) as pool:
        outputs = list(pool.map(call, [f"print({i})" for i in range(n)]))
    assert outputs == [f"{i}\n" for i in range(n)]


def _wall(fn: Callable[[], None]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows = [bench_backend("bwrap", args.repeats), bench_backend("rlimit", args.repeats), bench_subprocess(args.repeats)]
    table = Table(title="Sandbox latency (ms: median / p95)")
    columns = {
        "system": "system",
        "start": "start + first print(1)",
        "trip": "print(1) round trip",
        "warm64": "64 cells at once, warm (ms)",
        "cold64": "64 fresh sessions at once (ms)",
        "sympy": "import sympy (s)",
    }
    for key, title in columns.items():
        table.add_column(title, justify="left" if key == "system" else "right")
    for row in rows:
        table.add_row(*(row[key] for key in columns))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
