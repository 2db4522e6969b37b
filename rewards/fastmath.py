"""A small exact evaluator for the common answer shapes, so most comparisons never reach sympy.

It reads numbers, `+ - * / ^`, `\\frac`, `\\sqrt`, `\\pi`, `e`, `i`, `\\times`, `\\cdot`, implicit
multiplication, mixed numbers (`2\\frac{1}{2}`), a few functions and single-letter variables, and
answers built from them: tuples/intervals `(a, b]`, sets `\\{a, b\\}` and bare lists `a, b`.
Rationals stay exact (`fractions.Fraction`); anything irrational becomes a complex float compared
with a relative tolerance. Expressions with variables are compared at seeded random rational
points (an identity test that is exact for polynomials and rational functions). Anything it does
not fully understand raises `Undecided`, and the caller falls back to math-verify.

"Equal" is final. "Unequal" is final only when both sides were fully parsed into values of the
same kind: the same answer shape (one value, set/list, tuple/interval/matrix, union), no decimal
literal on either side unless the values differ by more than a rounding could (relative 1e-4;
math-verify rounds decimals, so `0.142857142857` may be meant as 1/7), and the same free variables. Every other "unequal" raises `Undecided`, so math-verify has the last word.
"""

from __future__ import annotations

import cmath
import re
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Union

Value = Union[Fraction, complex]
Env = dict[str, Fraction]
Node = Callable[[Env], Value]

REL_TOL = 1e-9
DECIMAL_TOL = 1e-4  # a decimal this far (relative) from the other side cannot be its rounding
_MAX_EXPONENT = 1000
_MAX_BITS = 20_000
_MAX_LEN = 400
_SAMPLE_POINTS = 3
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "phi", "omega", "sigma", "tau", "rho", "psi"}
_FUNCTIONS: dict[str, Callable[[complex], complex]] = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "ln": cmath.log, "exp": cmath.exp,
    "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "cot": lambda z: 1 / cmath.tan(z),
}


class Undecided(Exception):
    """The fast path cannot decide; use the general (sympy) verifier."""


def _approx(v: Value) -> complex:
    return complex(v) if isinstance(v, Fraction) else v


def _add(a: Value, b: Value) -> Value:
    return a + b if isinstance(a, Fraction) and isinstance(b, Fraction) else _approx(a) + _approx(b)


def _mul(a: Value, b: Value) -> Value:
    return a * b if isinstance(a, Fraction) and isinstance(b, Fraction) else _approx(a) * _approx(b)


def _div(a: Value, b: Value) -> Value:
    if b == 0:
        raise Undecided("division by zero")
    return a / b if isinstance(a, Fraction) and isinstance(b, Fraction) else _approx(a) / _approx(b)


def _exact_root(x: Fraction, n: int) -> Fraction | None:
    if x < 0 or n <= 0:
        return None
    num = round(x.numerator ** (1.0 / n)) if x.numerator.bit_length() < 1000 else None
    den = round(x.denominator ** (1.0 / n)) if x.denominator.bit_length() < 1000 else None
    if num is None or den is None:
        return None
    for a in (num - 1, num, num + 1):
        for b in (den - 1, den, den + 1):
            if a >= 0 and b > 0 and a ** n == x.numerator and b ** n == x.denominator:
                return Fraction(a, b)
    return None


def _pow(a: Value, b: Value) -> Value:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if b.denominator == 1:
            e = b.numerator
            bits = max(a.numerator.bit_length(), a.denominator.bit_length())
            if abs(e) > _MAX_EXPONENT or bits * abs(e) > _MAX_BITS:
                raise Undecided("exponent too large for exact arithmetic")
            if a == 0 and e < 0:
                raise Undecided("division by zero")
            return a ** e
        if b.denominator <= 12 and abs(b.numerator) <= _MAX_EXPONENT and a >= 0:
            root = _exact_root(a, b.denominator)
            if root is not None:
                return _pow(root, Fraction(b.numerator))
    try:
        za, zb = _approx(a), _approx(b)
        if za == 0:
            raise Undecided("zero to a complex power")
        r = za ** zb
    except (OverflowError, ZeroDivisionError) as exc:
        raise Undecided(str(exc)) from exc
    if not (math.isfinite(r.real) and math.isfinite(r.imag)):
        raise Undecided("overflow")
    return r


def _sqrt(a: Value) -> Value:
    if isinstance(a, Fraction):
        root = _exact_root(a, 2)
        if root is not None:
            return root
    return cmath.sqrt(_approx(a))


class _Parser:
    """Recursive descent over the characters of one (cleaned) LaTeX expression."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.variables: set[str] = set()

    # -- scanning
    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\n":
            self.i += 1

    def _peek(self) -> str:
        self._ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def _command(self) -> str | None:
        """The `\\name` at the cursor (without consuming it), or None."""
        self._ws()
        if self.s.startswith("\\", self.i):
            j = self.i + 1
            while j < len(self.s) and self.s[j].isalpha():
                j += 1
            return self.s[self.i + 1:j] if j > self.i + 1 else self.s[self.i:j + 1]
        return None

    def _eat(self, token: str) -> bool:
        self._ws()
        if self.s.startswith(token, self.i):
            if token[0] == "\\" and token[-1].isalpha():
                end = self.i + len(token)
                if end < len(self.s) and self.s[end].isalpha():
                    return False
            self.i += len(token)
            return True
        return False

    def _expect(self, token: str) -> None:
        if not self._eat(token):
            raise Undecided(f"expected {token!r} at {self.i} in {self.s!r}")

    # -- grammar
    def parse(self) -> Node:
        node = self.expr()
        if self._peek():
            raise Undecided(f"unparsed text {self.s[self.i:]!r}")
        return node

    def expr(self) -> Node:
        node = self.term()
        while True:
            if self._eat("+"):
                rhs = self.term()
                node = (lambda a, b: lambda env: _add(a(env), b(env)))(node, rhs)
            elif self._eat("-"):
                rhs = self.term()
                node = (lambda a, b: lambda env: _add(a(env), _mul(Fraction(-1), b(env))))(node, rhs)
            else:
                return node

    def _starts_factor(self) -> bool:
        c = self._peek()
        if not c:
            return False
        if c.isdigit() or c.isalpha() or c in "({.":
            return True
        cmd = self._command()
        return cmd is not None and (cmd in ("frac", "sqrt", "pi", "binom") or cmd in _FUNCTIONS or cmd in _GREEK)

    def term(self) -> Node:
        node = self.unary()
        while True:
            if self._eat("*") or self._eat("\\cdot") or self._eat("\\times"):
                rhs = self.unary()
                node = (lambda a, b: lambda env: _mul(a(env), b(env)))(node, rhs)
            elif self._eat("/") or self._eat("\\div"):
                rhs = self.unary()
                node = (lambda a, b: lambda env: _div(a(env), b(env)))(node, rhs)
            elif self._starts_factor():
                rhs = self.power()
                node = (lambda a, b: lambda env: _mul(a(env), b(env)))(node, rhs)
            else:
                return node

    def unary(self) -> Node:
        if self._eat("-"):
            inner = self.unary()
            return lambda env: _mul(Fraction(-1), inner(env))
        if self._eat("+"):
            return self.unary()
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self._eat("^"):
            exponent = self._argument(allow_sign=True)
            return lambda env: _pow(base(env), exponent(env))
        return base

    def _argument(self, allow_sign: bool = False) -> Node:
        """A LaTeX macro argument: `{...}` or one character (`\\frac12`, `x^2`), or `\\pi`-like."""
        c = self._peek()
        if c == "{":
            self.i += 1
            node = self.expr()
            self._expect("}")
            return node
        if allow_sign and c == "-":
            self.i += 1
            inner = self._argument()
            return lambda env: _mul(Fraction(-1), inner(env))
        if c.isdigit():
            self.i += 1
            v = Fraction(int(c))
            return lambda env: v
        if c.isalpha() or c == "\\":
            return self.atom()
        raise Undecided(f"bad argument at {self.i} in {self.s!r}")

    def _number(self) -> Node:
        j = self.i
        while j < len(self.s) and self.s[j].isdigit():
            j += 1
        if j < len(self.s) and self.s[j] == "." and j + 1 < len(self.s) and self.s[j + 1].isdigit():
            j += 1
            while j < len(self.s) and self.s[j].isdigit():
                j += 1
        text = self.s[self.i:j]
        self.i = j
        if self.s.startswith("_", self.i):
            raise Undecided("number with a subscript (a base)")
        v = Fraction(text)
        if "." not in text and self._command() == "frac":  # 2\frac{1}{2}: a mixed number
            save = self.i
            self._eat("\\frac")
            num_start = self.i
            frac = self._frac_args()
            args = self.s[num_start:self.i].replace("{", "").replace("}", "").replace(" ", "")
            if all(part.isdigit() for part in args) and args:
                f = frac({})
                return lambda env: v + f
            self.i = save
        return lambda env: v

    def _frac_args(self) -> Node:
        num = self._argument()
        den = self._argument()
        return lambda env: _div(num(env), den(env))

    def atom(self) -> Node:
        c = self._peek()
        if c.isdigit() or (c == "." and self.i + 1 < len(self.s) and self.s[self.i + 1].isdigit()):
            return self._number()
        if c in "({":
            close = ")" if c == "(" else "}"
            self.i += 1
            node = self.expr()
            self._expect(close)
            return node
        if c.isalpha():
            self.i += 1
            if c == "i":
                return lambda env: 1j
            if c == "e":
                return lambda env: complex(math.e)
            return self._variable(c)
        cmd = self._command()
        if cmd is None:
            raise Undecided(f"unexpected {c!r} in {self.s!r}")
        self.i += 1 + len(cmd)
        if cmd == "frac":
            return self._frac_args()
        if cmd == "sqrt":
            if self._eat("["):
                index = self.expr()
                self._expect("]")
                arg = self._argument()
                return lambda env: _pow(arg(env), _div(Fraction(1), index(env)))
            arg = self._argument()
            return lambda env: _sqrt(arg(env))
        if cmd == "pi":
            return lambda env: complex(math.pi)
        if cmd == "binom":
            n, k = self._argument(), self._argument()

            def binom(env: Env) -> Value:
                nv, kv = n(env), k(env)
                if not (isinstance(nv, Fraction) and isinstance(kv, Fraction) and nv.denominator == kv.denominator == 1):
                    raise Undecided("non-integer binomial")
                if not 0 <= nv.numerator <= 10_000:
                    raise Undecided("binomial too large")
                return Fraction(math.comb(nv.numerator, kv.numerator) if kv >= 0 else 0)

            return binom
        if cmd in _GREEK:
            return self._variable(cmd)
        if cmd in _FUNCTIONS:
            fn = _FUNCTIONS[cmd]
            if self._peek() == "^":
                raise Undecided("powers of functions")
            arg = self.power()
            return lambda env: fn(_approx(arg(env)))
        raise Undecided(f"unsupported command \\{cmd}")

    def _variable(self, name: str) -> Node:
        if self.s.startswith("_", self.i):
            self.i += 1
            if self._peek() == "{":
                end = self.s.find("}", self.i)
                if end == -1:
                    raise Undecided("unbalanced subscript")
                name += "_" + self.s[self.i + 1:end].strip()
                self.i = end + 1
            elif self._peek():
                name += "_" + self.s[self.i]
                self.i += 1
        self.variables.add(name)
        return lambda env: env[name]


def _split_top(s: str) -> list[str]:
    """Split at commas outside (), [], {} and \\{ \\}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


@dataclass(frozen=True)
class Shape:
    kind: str  # "single" | "list" (bare, unordered) | "set" | "ordered" (tuple, interval, matrix) | "union"
    left: str
    right: str
    items: tuple[str, ...]


_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix|smallmatrix|array)\}(?:\{[lcr| ]*\})?(.*)\\end\{\1\}$", re.DOTALL)
_DECIMAL = re.compile(r"\d*\.\d")


def _top_level_split(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith(sep, i) and depth == 0:
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        depth += s[i] in "([{"
        depth -= s[i] in ")]}"
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def shape_of(s: str) -> Shape:
    s = s.strip()
    if s[:1] in "([" and s[-1:] in ")]" and _MATRIX.match(s[1:-1].strip()):  # \left( array \right)
        s = s[1:-1].strip()
    if m := _MATRIX.match(s):
        rows = [r for r in (x.strip() for x in m.group(2).split("\\\\")) if r]
        cells = [[c.strip() for c in r.split("&")] for r in rows]
        if len({len(r) for r in cells}) != 1:
            raise Undecided("ragged matrix")
        return Shape("ordered", "matrix", f"{len(cells)}x{len(cells[0])}", tuple(c for r in cells for c in r))
    if len(_top_level_split(s, "\\cup")) > 1:
        return Shape("union", "", "", tuple(_top_level_split(s, "\\cup")))
    if s.count("\\pm") == 1 and "," not in s:  # a \pm b: the two values, in any order
        return Shape("list", "", "", (s.replace("\\pm", "+"), s.replace("\\pm", "-")))
    if s.startswith("\\{") and s.endswith("\\}"):
        return Shape("set", "{", "}", tuple(_split_top(s[2:-2])))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = _split_top(s[1:-1])
        if len(inner) > 1 and _balanced_inside(s[1:-1]):
            return Shape("ordered", s[0], s[-1], tuple(inner))
    parts = _split_top(s)
    if len(parts) > 1:
        return Shape("list", "", "", tuple(parts))
    return Shape("single", "", "", (s,))


def _balanced_inside(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth < 0:
            return False
    return depth == 0


_INFINITY = {"\\infty": math.inf, "+\\infty": math.inf, "-\\infty": -math.inf, "\\inf": math.inf, "-\\inf": -math.inf}


def evaluate(element: str) -> tuple[Node, set[str]]:
    if len(element) > _MAX_LEN:
        raise Undecided("too long for the fast path")
    key = element.replace(" ", "")
    if key in _INFINITY:
        v = complex(_INFINITY[key])
        return (lambda env: v), set()
    for bad in ("\\cup", "\\cap", "\\pm", "\\mp", "=", "<", ">", "\\le", "\\ge", "\\ne", "!", "\\text", "\\begin",
                "\\infty", "\\log", "|", "\\%", "\\to"):
        if bad in element:
            raise Undecided(f"{bad} is left to the general verifier")
    parser = _Parser(element)
    node = parser.parse()
    return node, parser.variables


def values_equal(a: Value, b: Value) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    za, zb = _approx(a), _approx(b)
    if any(math.isnan(x) for x in (za.real, za.imag, zb.real, zb.imag)):
        raise Undecided("nan")
    if math.isinf(za.real) or math.isinf(zb.real):
        return za == zb
    return abs(za - zb) <= REL_TOL * max(1.0, abs(za), abs(zb))


def sample_points(variables: set[str], seed: int = 20250122) -> list[Env]:
    """Seeded random rational points, one value per variable name (sorted for determinism)."""
    if not variables:
        return [{}]
    rng = random.Random(seed)
    names = sorted(variables)
    return [{n: Fraction(rng.randint(3, 97), rng.randint(2, 19)) for n in names} for _ in range(_SAMPLE_POINTS)]


def _eval_at(node: Node, points: list[Env]) -> tuple[Value, ...]:
    try:
        return tuple(node(p) for p in points)
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        raise Undecided(str(exc)) from exc


def _items_equal(a: tuple[Value, ...], b: tuple[Value, ...]) -> bool:
    return all(values_equal(x, y) for x, y in zip(a, b))


def _is_word(s: str) -> bool:
    return len(s) >= 2 and s.replace(" ", "").isalpha()


def fast_equal(pred: str, gold: str, percent: bool = False) -> bool:
    """Decide pred == gold for cleaned answers, or raise Undecided.

    `percent`: a % was written on either side, so x, x/100 and 100x are all accepted.
    """
    if (bp := _BASE_NUMBER.fullmatch(pred.strip())) and (bg := _BASE_NUMBER.fullmatch(gold.strip())):
        return (bp[1].lstrip("0"), bp[2]) == (bg[1].lstrip("0"), bg[2])  # `2516_8`: digits in one base
    if pred.count("=") == 1 and gold.count("=") == 1:
        return _equations_equal(pred, gold)
    sp, sg = shape_of(pred), shape_of(gold)
    if sp.kind == "union" or sg.kind == "union":  # unions of intervals: the same pieces, any order
        if sp.kind != sg.kind:
            raise Undecided("a union against a non-union")
        pieces = [shape_of(x) for x in sp.items + sg.items]
        if any(x.kind != "ordered" or len(x.items) != 2 for x in pieces):
            raise Undecided("union of non-intervals")
        return _unordered_equal(list(sp.items), list(sg.items), lambda a, b: fast_equal(a, b))
    if any(_is_word(x) for x in sp.items + sg.items):
        raise Undecided("text answers")
    from .normalize import clean_answer

    # `x = 1, y = 2` and `x = 1, 2`: strip each element's own `var =`
    p_items = [clean_answer(x).latex for x in sp.items]
    g_items = [clean_answer(x).latex for x in sg.items]
    parsed_p = [evaluate(x) for x in p_items]
    parsed_g = [evaluate(x) for x in g_items]
    variables = set().union(*(v for _, v in parsed_p + parsed_g))
    points = sample_points(variables)
    vp = [_eval_at(n, points) for n, _ in parsed_p]
    vg = [_eval_at(n, points) for n, _ in parsed_g]

    def equal(a: tuple[Value, ...], b: tuple[Value, ...]) -> bool:
        if _items_equal(a, b):
            return True
        if percent and not variables:
            hundred = Fraction(100)
            return _items_equal(a, tuple(_mul(x, hundred) for x in b)) or _items_equal(
                tuple(_mul(x, hundred) for x in a), b)
        return False

    if sp.kind == "ordered" and sg.kind == "ordered":
        same = (sp.left, sp.right) == (sg.left, sg.right) and len(vp) == len(vg) and all(
            equal(a, b) for a, b in zip(vp, vg))
    elif {sp.kind, sg.kind} <= {"list", "set", "single"} and (sp.kind != "single" or sg.kind != "single"):
        same = _unordered_equal(vp, vg, equal)
    elif sp.kind == sg.kind == "single":
        same = equal(vp[0], vg[0])
    elif {sp.kind, sg.kind} == {"ordered", "list"}:  # "(1, 2)" vs "1, 2": same order required
        same = len(vp) == len(vg) and all(equal(a, b) for a, b in zip(vp, vg))
    else:
        same = False
    if same:
        return True
    if sp.kind != sg.kind and {sp.kind, sg.kind} != {"list", "set"}:
        raise Undecided(f"a {sp.kind} against a {sg.kind}")
    if any(_DECIMAL.search(x) for x in p_items + g_items) and not (
            len(vp) == len(vg) and not variables and all(_far_apart(a[0], b[0]) for a, b in zip(vp, vg))):
        raise Undecided("a decimal may be a rounded value")
    if set().union(*(v for _, v in parsed_p)) != set().union(*(v for _, v in parsed_g)):
        raise Undecided("different free variables")
    return False


_BASE_NUMBER = re.compile(r"(\d+)_\{?(\d+)\}?")


def _equations_equal(pred: str, gold: str) -> bool:
    """`lhs = rhs` on both sides: the same equation when lhs - rhs agree up to a nonzero factor."""
    sides = [x.split("=") for x in (pred, gold)]
    if any(not a.strip() or not b.strip() or "\\" in a + b or "," in a + b for a, b in sides):
        raise Undecided("not a single equation")
    parsed = [(evaluate(a.strip()), evaluate(b.strip())) for a, b in sides]
    variables = [pa[1] | pb[1] for pa, pb in parsed]
    if not variables[0] or variables[0] != variables[1]:
        raise Undecided("equations in different variables")
    points = sample_points(variables[0])
    diffs = [[_add(x, _mul(Fraction(-1), y)) for x, y in zip(_eval_at(pa[0], points), _eval_at(pb[0], points))]
             for pa, pb in parsed]
    if not all(isinstance(v, Fraction) for d in diffs for v in d) or any(v == 0 for d in diffs for v in d):
        raise Undecided("an equation this evaluator cannot compare exactly")
    if len({dp / dg for dp, dg in zip(*diffs)}) == 1:
        return True
    if any(_DECIMAL.search(x) for x in (pred, gold)):
        raise Undecided("a decimal may be a rounded value")
    return False


def _far_apart(a: Value, b: Value) -> bool:
    """Too far apart for one to be a rounding of the other (relative 1e-4; math-verify's float
    rounding is at the 6th decimal)."""
    za, zb = _approx(a), _approx(b)
    return abs(za - zb) > DECIMAL_TOL * max(1.0, abs(za), abs(zb))


def _unordered_equal(a: list, b: list, equal: Callable) -> bool:
    if len(a) != len(b):
        return False
    remaining = list(b)
    for x in a:
        for k, y in enumerate(remaining):
            if equal(x, y):
                del remaining[k]
                break
        else:
            return False
    return True
