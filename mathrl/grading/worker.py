"""A grading worker: ``python -m mathrl.grading.worker``, started by :mod:`mathrl.grading.pool`.

Reads tasks from the request pipe and writes each one's reply to the reply pipe: ``[given,
reference]``, mathrl's symbolic verdict (a bool); ``["math_verify", response, reference, style]``,
math-verify's ``[verdict, answer]`` (:mod:`mathrl.grading.peer`); descriptor numbers in argv,
:mod:`mathrl.workers` messages. It caps its own memory; its parent kills it when a comparison passes the deadline.
"""

from __future__ import annotations

import resource
import sys

from mathrl.grading import numbers, peer
from mathrl.grading.match import match
from mathrl.grading.symbolic import to_sympy
from mathrl.workers import read_message, write_message

MEMORY_LIMIT_BYTES = 3 << 30


def serve() -> None:
    """Worker main loop: read a task, answer its reply (junk input is "not equal")."""
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
        reply: object
        try:
            assert isinstance(pair, list)
            if len(pair) == 4 and pair[0] == "math_verify":
                reply = [False, None]
                reply = list(peer.grade(str(pair[1]), str(pair[2]), str(pair[3])))
            else:
                reply = False
                reply = match(str(pair[0]), str(pair[1]), symbolic=True)
        except Exception:  # a parser or sympy failure on junk input is "not equal"
            pass
        write_message(out, reply)


if __name__ == "__main__":
    serve()
