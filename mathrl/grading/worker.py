"""A grading worker: ``python -m mathrl.grading.worker``, started by :mod:`mathrl.grading.pool`.

Reads (given, reference) pairs from the request pipe and writes the symbolic verdict for
each to the reply pipe (descriptor numbers in argv; :mod:`mathrl.workers` messages). It
caps its own memory; its parent kills it when a comparison passes the deadline.
"""

from __future__ import annotations

import resource
import sys

from mathrl.grading import numbers
from mathrl.grading.match import match
from mathrl.grading.symbolic import to_sympy
from mathrl.workers import read_message, write_message

MEMORY_LIMIT_BYTES = 3 << 30


def serve() -> None:
    """Worker main loop: read (given, reference), answer the symbolic verdict."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    sys.setrecursionlimit(50_000)
    numbers.MAX_DEPTH = 5_000  # deeply nested but honest numbers (1/(1/(...))) are evaluated here
    to_sympy("x+1")  # load the parser before saying ready
    inp, out = int(sys.argv[1]), int(sys.argv[2])
    write_message(out, "ready")
    while True:
        try:
            pair = read_message(inp)
        except EOFError:
            return
        try:
            assert isinstance(pair, list)
            verdict = match(str(pair[0]), str(pair[1]), symbolic=True)
        except Exception:  # a parser or sympy failure on junk input is "not equal"
            verdict = False
        write_message(out, verdict)


if __name__ == "__main__":
    serve()
