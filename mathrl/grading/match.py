"""The grading policy: when is a given answer equal to the reference?

Cheap decisions come first and run in the caller's process: equal canonical strings,
multiple-choice letters, words (units, text answers), numbers in a base, exact rational
values (:mod:`mathrl.grading.numbers`), and the answer's shape (:mod:`mathrl.grading.structure`).
Only when those cannot decide is the symbolic side needed; with ``symbolic=False``
:func:`match` then raises :class:`NeedsSymbolic`, and the pool re-runs it in a worker
process with ``symbolic=True`` under a hard deadline.
"""

from __future__ import annotations

import re

from mathrl.grading import numbers
from mathrl.grading.normalize import normalize, split_words, unwrap
from mathrl.grading.structure import NAME, Atom, Bag, Matrix, Named, Node, Seq, parse, split_top


class NeedsSymbolic(Exception):
    """The cheap checks cannot decide; sympy must."""


MAX_CHARS = 3000  # longer answers are compared as canonical strings only


def match(given: str | None, reference: str, symbolic: bool = True) -> bool:
    """Whether ``given`` is mathematically the ``reference`` answer (see module docs)."""
    if given is None:
        return False
    exact_r = _exact_of_approx(reference)
    if exact_r is not None:  # "\sqrt2 \approx 1.414": the exact value is the reference
        reference = exact_r[0]
    exact_g = _exact_of_approx(given)
    if exact_g is not None:  # an exact value and its decimal: both must be right
        return match(exact_g[0], reference, symbolic) and match(exact_g[0], exact_g[1], symbolic)
    g, r = normalize(given), normalize(reference)
    if not g or not r:
        return False
    if g == r:
        return True
    if len(g) > MAX_CHARS or len(r) > MAX_CHARS:
        return False
    choice_r = _choice(r)
    if choice_r is not None:
        return _choice(g, leading=True) == choice_r
    if _TEXT_CMD.search(g + r) and _plain(g) == _plain(r):
        return True
    undecided = False
    for node_r in parse(r):
        for node_g in parse(g):
            try:
                if _nodes_equal(node_g, node_r, symbolic):
                    return True
            except NeedsSymbolic:
                undecided = True
    if undecided:
        raise NeedsSymbolic
    return False


_APPROX = re.compile(r"\\approx|≈|\\simeq")


def _exact_of_approx(s: str) -> tuple[str, str] | None:
    """(exact, decimal) for ``exact \\approx decimal``, where the decimal is a plain number."""
    parts = _APPROX.split(s)
    if len(parts) != 2 or not parts[0].strip() or NAME.fullmatch(normalize(parts[0])):
        return None  # "x \\approx 11" names an approximate value
    decimal, exact = numbers.parse_number(normalize(parts[1])), numbers.parse_number(normalize(parts[0]))
    if decimal is None or (exact is not None and exact.unit is not None):
        return None  # not "exact \\approx decimal" (a decimal approximating a decimal stays as written)
    return parts[0], parts[1]


_CHOICE = re.compile(r"\(?([A-Z])\)?(?:(?:,|and)\(?([A-Z])\)?)*")
_TEXT_CMD = re.compile(r"\\(?:text|mbox|textbf|mathrm|mathbf)\s*\{")


def _choice(s: str, leading: bool = False) -> frozenset[str] | None:
    """The letters of a multiple-choice answer: ``C``, ``(C)``, ``\\text{(C)}``, ``A, D``
    (any order); with ``leading``, also ``(C) 12``."""
    t = unwrap(s, _TEXT_CMD).replace(" ", "")
    if _CHOICE.fullmatch(t):
        return frozenset(re.findall(r"[A-Z]", t))
    m = re.match(r"\(([A-Z])\)", t) if leading else None
    return frozenset(m.group(1)) if m else None


def _plain(s: str) -> str:
    """Text answers compared loosely: no text commands, case or spaces."""
    return re.sub(r"\s+", "", unwrap(s, _TEXT_CMD)).lower().rstrip(".")


def _nodes_equal(g: Node, r: Node, symbolic: bool) -> bool:
    if isinstance(g, Bag) and len(g.items) == 1 and not isinstance(r, Bag):
        return _nodes_equal(g.items[0], r, symbolic)
    if isinstance(r, Atom):
        return isinstance(g, Atom) and atoms_equal(g.text, r.text, symbolic)
    if isinstance(r, Bag):
        items = g.items if isinstance(g, Bag) else (g,)
        return _same_multiset(items, r.items, symbolic)
    if isinstance(r, Seq):
        if isinstance(g, Seq):
            return (g.open, g.close) == (r.open, r.close) and _same_sequence(g.items, r.items, symbolic)
        if isinstance(g, Named):
            return _same_sequence(g.values, r.items, symbolic)
        if isinstance(g, Matrix) and all(len(row) == 1 for row in g.rows):
            return _same_sequence(tuple(row[0] for row in g.rows), r.items, symbolic)
        return False
    if isinstance(r, Named):
        if isinstance(g, Named):
            if sorted(g.names) != sorted(r.names):
                return False
            by_name = dict(zip(g.names, g.values, strict=True))
            return _same_sequence(tuple(by_name[n] for n in r.names), r.values, symbolic)
        if isinstance(g, Seq | Bag):
            return _same_sequence(g.items, r.values, symbolic)
        return False
    if isinstance(g, Atom) and "\\begin{" in g.text:  # a scalar times a matrix, say
        if not symbolic:
            raise NeedsSymbolic
        from mathrl.grading.symbolic import matrix_cells

        cells = matrix_cells(g.text)
        g = Matrix(tuple(tuple(Atom(c) for c in row) for row in cells)) if cells else g
    if isinstance(g, Matrix):
        return len(g.rows) == len(r.rows) and all(
            _same_sequence(a, b, symbolic) for a, b in zip(g.rows, r.rows, strict=True)
        )
    if isinstance(g, Seq) and all(len(row) == 1 for row in r.rows):
        return _same_sequence(g.items, tuple(row[0] for row in r.rows), symbolic)
    return False


def _same_sequence(g: tuple[Node, ...], r: tuple[Node, ...], symbolic: bool) -> bool:
    if len(g) != len(r):
        return False
    undecided = False
    for a, b in zip(g, r, strict=True):
        try:
            if not _nodes_equal(a, b, symbolic):
                return False
        except NeedsSymbolic:
            undecided = True
    if undecided:
        raise NeedsSymbolic
    return True


def _same_multiset(g: tuple[Node, ...], r: tuple[Node, ...], symbolic: bool) -> bool:
    """A perfect matching between ``g`` and ``r`` under equality (Kuhn's augmenting
    paths: O(n^3) comparisons at most, whatever the input)."""
    if len(g) != len(r):
        return False
    if len(g) > 50:
        return sorted(map(repr, g)) == sorted(map(repr, r))
    undecided = False
    equal: dict[tuple[int, int], bool] = {}

    def eq(i: int, j: int) -> bool:
        nonlocal undecided
        if (i, j) not in equal:
            try:
                equal[i, j] = _nodes_equal(g[i], r[j], symbolic)
            except NeedsSymbolic:
                undecided = True
                equal[i, j] = False
        return equal[i, j]

    owner: dict[int, int] = {}  # r index -> g index

    def augment(i: int, seen: set[int]) -> bool:
        for j in range(len(r)):
            if j not in seen and eq(i, j):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    if all(augment(i, set()) for i in range(len(g))):
        return True
    if undecided:
        raise NeedsSymbolic
    return False


_BASE = re.compile(r"([0-9A-Za-z]+)_\{?(\d+)\}?")


def atoms_equal(g: str, r: str, symbolic: bool) -> bool:
    """Equality of two single expressions (either may be ``name = value`` or an equation)."""
    if g == r:
        return True
    g_sides, r_sides = split_top(g, "="), split_top(r, "=")
    if len(r_sides) > 1 and all(numbers.parse_number(side) for side in r_sides):
        # "0.56 = 56\%": a reference that states one value several ways accepts each of them
        return any(atoms_equal(g, side.strip(), symbolic) for side in r_sides)
    g_named = len(g_sides) >= 2 and _is_name(g_sides[0])
    r_named = len(r_sides) == 2 and _is_name(r_sides[0])
    if len(g_sides) == 2 and len(r_sides) == 2 and not (g_named and r_named):
        return _equations_equal(g_sides, r_sides, symbolic)  # a relation, possibly rearranged
    if len(r_sides) == 2:
        if not r_named:
            return False
        if g_named and g_sides[0].strip() != r_sides[0].strip():
            return False
        r = r_sides[1].strip()
    if len(g_sides) >= 2:
        if not (g_named or len(g_sides) > 2):
            return False
        g = g_sides[-1].strip()
    if g == r:
        return True

    g_math, g_words = split_words(g)
    r_math, r_words = split_words(r)
    if not g_math or not r_math:
        if (g_math and not _words_only(g_math)) or (r_math and not _words_only(r_math)):
            return False  # a mathematical answer against a text answer
        g_words, r_words = g_words + _words_only(g_math), r_words + _words_only(r_math)
        return bool(g_words) and g_words == r_words
    if g_words and r_words and g_words != r_words:
        return False
    g, r = g_math, r_math
    if g == r:
        return True

    ratio = _ratios_equal(g, r)
    if ratio is not None:
        return ratio
    tower_g, tower_r = numbers.parse_tower(g), numbers.parse_tower(r)
    if tower_g is not None and tower_r is not None:  # 2^{2^{100}} and 4^{2^{99}}, exactly
        return tower_g == tower_r

    base_g, base_r = _BASE.fullmatch(g), _BASE.fullmatch(r)
    if (base_g or base_r) and any(b and re.search(r"\d", b.group(1)) for b in (base_g, base_r)):
        digits_g = (base_g.group(1) if base_g else g).lower().lstrip("0")
        digits_r = (base_r.group(1) if base_r else r).lower().lstrip("0")
        same_base = not (base_g and base_r) or base_g.group(2) == base_r.group(2)
        return same_base and digits_g == digits_r

    num_g, num_r = numbers.parse_number(g), numbers.parse_number(r)
    if num_g is not None and num_r is not None:
        return numbers.numbers_match(num_g, num_r)
    if not symbolic:
        raise NeedsSymbolic
    from mathrl.grading.symbolic import expressions_equal

    return expressions_equal(g, r, num_r.unit if num_r else None)


# what names a quantity on the left of "=": a variable, a function value (f(x), h^{-1}(x), f'(x)),
# a segment, its length or a ratio of them (AB, |AB|, A:B, V_1:V_2, \frac{NO}{BO})
_SEGMENT = r"[A-Z]{1,4}'*(?:_\{?[A-Za-z0-9]+\}?)?"
_PART = rf"(?:{_SEGMENT}|[a-z](?:_\{{?[A-Za-z0-9]+\}}?)?)"  # a ratio's term: AB, V_1, x, a_2
_QUANTITY = re.compile(
    rf"[A-Za-z]'*(?:\^\{{?-1\}}?)?\([A-Za-z]\)|{_SEGMENT}|\|{_SEGMENT}\||{_PART}(?::{_PART})+"
    rf"|\\frac\{{{_SEGMENT}\}}\{{{_SEGMENT}\}}"
)


def _is_name(lhs: str) -> bool:
    """Whether ``lhs`` (the left side of ``lhs = value``) names the value rather than being
    an expression: then ``lhs = value`` is the answer ``value``."""
    lhs = lhs.strip()
    return bool(NAME.fullmatch(lhs) or _QUANTITY.fullmatch(lhs))


def _ratios_equal(g: str, r: str) -> bool | None:
    """Ratios and times of plain numbers (``3:4``, ``12:00``): None when neither side is one.
    Equal when proportional, but part by part when a part is zero or has a leading zero, or
    both end in two digits (times: ``12:00`` is not ``1:00``, ``8:60`` is not ``4:30``)."""
    g_parts, r_parts = g.split(":"), r.split(":")
    if len(g_parts) == 1 and len(r_parts) == 1:
        return None
    values = [numbers.parse_number(p) for p in g_parts + r_parts]
    if any(v is None for v in values):
        return None
    nums = [v.value for v in values if v is not None]
    if len(g_parts) != len(r_parts):
        return False if 0 in nums else None
    a, b = nums[: len(g_parts)], nums[len(g_parts) :]
    times = all(re.fullmatch(r"\d{2}", p[-1].strip()) for p in (g_parts, r_parts))  # h:mm on both sides
    if times or 0 in nums or any(re.fullmatch(r"0\d+", p.strip()) for p in g_parts + r_parts):
        return a == b
    return all(x * b[0] == y * a[0] for x, y in zip(a, b, strict=True))


def _equations_equal(g_sides: list[str], r_sides: list[str], symbolic: bool) -> bool:
    if not symbolic:
        raise NeedsSymbolic
    from mathrl.grading.symbolic import equations_equal

    return equations_equal((g_sides[0], g_sides[1]), (r_sides[0], r_sides[1]))


def _words_only(s: str) -> tuple[str, ...]:
    """The words of ``s`` when it is nothing but words, else ``()``."""
    if s and re.fullmatch(r"[A-Za-z.'\- ]+", s):
        return split_words(f"\\text{{{s}}}")[1]
    return ()
