"""Symbolic equality of two expressions with sympy (parsed by latex2sympy2_extended).

This is the slow, unbounded part of grading (simplification can take seconds, an
exponent tower forever): it runs only inside the worker processes of
:mod:`mathrl.grading.pool`, which kill it at the deadline. It still refuses obvious
giants (towers, huge factorials) itself, so such inputs answer "not equal" at once
instead of timing out.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy

_CONFIG = ConversionConfig(interpret_as_mixed_fractions=True, lowercase_symbols=False)
_I = sympy.Symbol("i")
_BIG_EXPONENT = 10_000
MAX_NESTING = 40  # the ANTLR parser is exponential in nesting depth; deeper input is refused


def _nesting(latex: str) -> int:
    depth = deepest = 0
    for ch in latex:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest


@functools.lru_cache(maxsize=4096)
def to_sympy(latex: str) -> Any:
    """sympy object for ``latex`` (already normalized), or None when it does not parse.
    The letter ``i`` is read as the imaginary unit (answers never use it as a variable)."""
    if _nesting(latex) > MAX_NESTING:
        return None
    try:
        expr = latex2sympy(latex, normalization_config=None, conversion_config=_CONFIG)
    except Exception:
        return None
    if not isinstance(expr, sympy.Basic):
        return None
    if _I in expr.free_symbols:
        expr = expr.subs(_I, sympy.I)
    floats = expr.atoms(sympy.Float)
    if floats:  # a written decimal is that exact rational, never a rounded float
        expr = expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
    return expr


def is_giant(expr: Any) -> bool:
    """True when evaluating ``expr`` could build an astronomically large number."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            base, exponent = node.args
            if exponent.has(sympy.Pow) and base.is_number and exponent.is_number:
                return True
            if exponent.is_Number and abs(exponent) > _BIG_EXPONENT and base.is_number:
                return True
        elif isinstance(node, sympy.factorial | sympy.factorial2 | sympy.gamma):
            arg = node.args[0]
            if arg.is_number and (arg.has(sympy.Pow, sympy.factorial) or (arg.is_Number and abs(arg) > 1000)):
                return True
    return False


def evaluate(expr: Any) -> Any:
    """Rebuild ``expr`` bottom-up with evaluation on: the parser leaves sums and products
    unevaluated (``3+2x`` and ``2x+3`` would differ). Call only after :func:`is_giant`."""
    if not isinstance(expr, sympy.Basic) or not expr.args or isinstance(expr, sympy.MatrixBase):
        return expr
    try:
        return expr.func(*[evaluate(arg) for arg in expr.args])
    except Exception:
        return expr


def expressions_equal(given: str, reference: str, reference_unit: Fraction | None = None) -> bool:
    """Whether two LaTeX expressions are mathematically equal. With ``reference_unit``
    (the reference is a rounded decimal) a given value within half a unit counts."""
    a, b = to_sympy(given), to_sympy(reference)
    if a is None or b is None:
        return False
    if isinstance(a, sympy.Eq) or isinstance(b, sympy.Eq):
        return False
    if is_giant(a) or is_giant(b):
        return sympy.srepr(a) == sympy.srepr(b)
    try:
        return _equal(evaluate(a), evaluate(b), reference_unit)
    except Exception:
        return False


def matrix_cells(latex: str) -> list[list[str]] | None:
    """The entries (as LaTeX) of a matrix written as an expression, e.g. a scalar times a
    ``pmatrix``; None when ``latex`` is not a matrix."""
    expr = to_sympy(latex)
    if expr is None or is_giant(expr):
        return None
    try:
        matrix = sympy.Matrix(evaluate(expr).doit())
    except Exception:
        return None
    return [[sympy.latex(matrix[i, j]) for j in range(matrix.cols)] for i in range(matrix.rows)]


def equations_equal(given: tuple[str, str], reference: tuple[str, str]) -> bool:
    """``l1 = r1`` and ``l2 = r2`` describe the same relation: ``l1 - r1`` is a nonzero
    constant multiple of ``l2 - r2``."""
    sides = [to_sympy(x) for x in (*given, *reference)]
    if any(s is None or isinstance(s, sympy.Eq) or is_giant(s) for s in sides):
        return False
    sides = [evaluate(x) for x in sides]
    try:
        d1 = sympy.expand(sides[0] - sides[1])
        d2 = sympy.expand(sides[2] - sides[3])
        if d1 == 0 or d2 == 0:
            return bool(d1 == d2)
        ratio = sympy.simplify(d1 / d2)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite)
    except Exception:
        return False


def _equal(a: Any, b: Any, unit: Fraction | None) -> bool:
    if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
        return bool(
            isinstance(a, sympy.MatrixBase)
            and isinstance(b, sympy.MatrixBase)
            and a.shape == b.shape
            and all(_equal(x, y, None) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, sympy.Set) or isinstance(b, sympy.Set):
        return bool(a == b)
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return bool(a == b)
    if a == b:
        return True
    diff = a - b
    if not diff.free_symbols:
        value = sympy.N(diff, 80)
        if unit is not None and value.is_real:
            return bool(abs(value) <= sympy.Rational(unit.numerator, unit.denominator) / 2)
        if value.is_number and abs(value) < sympy.Float("1e-60") * max(1, abs(sympy.N(b, 80))):
            return True
        return bool(sympy.simplify(diff) == 0)
    if sympy.expand(diff) == 0:
        return True
    if a.free_symbols != b.free_symbols:
        return False
    return bool(sympy.simplify(diff) == 0)
