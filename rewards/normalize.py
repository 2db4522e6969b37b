"""Surface normalisation of final answers: the forms people and models write for the same value.

`clean_answer` returns LaTeX that still parses (for math-verify) with the decoration removed:
`$...$`, `\\boxed{}`, `\\dfrac`, `\\left/\\right`, spacing commands, units text, degrees, dollars,
percent (remembered as a flag), thousands separators, a leading `x =`, choice letters `(A)`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .extract import last_boxed, strip_math_delimiters

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
    "\u00f7": "/", "\u00b0": "^\\circ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt",
    "\u2264": "\\le ", "\u2265": "\\ge ", "\u222a": "\\cup ", "\u00b1": "\\pm ", "\u2009": " ", "\u00a0": " ",
}
_UNIT_WORDS = (
    "units?|square units|sq units|cm|mm|km|m|meters?|metres?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mph|"
    "seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|cents?|dollars?|pounds?|lbs?|ounces?|oz|"
    "grams?|kg|g|liters?|litres?|ml|gallons?|degrees?|deg|percent|points?|people|students?|ways|cookies|apples"
)
_TRAILING_UNIT_TEXT = re.compile(r"(?<=[\d}a-zA-Z)])\s*\\(?:text|mbox|mathrm|textnormal)\s*\{\s*[^{}]*\}(\^\{?[23]\}?)?\s*$")
_TRAILING_UNIT_WORD = re.compile(rf"(?<=\d)\s+(?:square\s+|sq\.?\s+|cubic\s+)?(?:{_UNIT_WORDS})\.?(\^\{{?[23]\}}?)?\s*$", re.IGNORECASE)
_WHOLE_TEXT = re.compile(r"^\\(?:text|textbf|textit|mathrm|mathbf|mbox|textnormal)\s*\{([^{}]*)\}$")
_LEADING_VAR = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=(?!=)\s*")
_CHOICE = re.compile(r"^\(?\s*([A-Ea-e])\s*\)?$")
# `1,000`, `10,455.5`: groups of three after a first group of 1-3 digits that does not start with 0
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
# `0,111`, `1000,99`: one comma that no thousands grouping explains, after a 0 or 4+ digits, is a decimal comma
_DECIMAL_COMMA = re.compile(r"^(-?(?:0|[1-9]\d{3,})),(\d+)$")
# `12,\!345`, `12{,}345`, `12\,345`: a separator inside a number (three digits follow)
_DIGIT_GROUP = re.compile(r"(?<=\d)(?:\s*,\s*\\!\s*|\s*\\!\s*,\s*|\s*\{,\}\s*|\\,\s*|\\!\s*)(?=\d{3}(?!\d))")
_RELATIONS = (  # (pattern, one spelling); \geq before \ge so the longer name wins
    (r"\\geqslant|\\geq|\\ge(?![a-zA-Z])|>=|=>", "\\ge "), (r"\\leqslant|\\leq|\\le(?![a-zA-Z])|<=|=<", "\\le "),
    (r"\\neq|\\ne(?![a-zA-Z])|!=|\\not=", "\\ne "), (r"\\gt(?![a-zA-Z])", ">"), (r"\\lt(?![a-zA-Z])", "<"),
)
_REPEATING = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\overline\s*\{\s*(\d+)\s*\}")
_PERCENT_WORD = re.compile(r"(?<=[\d}])\s*(?:\\text\{\s*)?(?:percent|per\s*cent|pct)\.?\s*\}?\s*$", re.IGNORECASE)
_JOINER = re.compile(r"\s*(?:\\text\{\s*(?:and|or)\s*\}|\\(?:quad|qquad)?\s*(?:and|or)(?![a-zA-Z])|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z]))\s*")


@dataclass(frozen=True)
class CleanAnswer:
    latex: str  # still valid LaTeX
    percent: bool  # a % sign was written: the value may be meant as x or x/100


def _repeating_to_fraction(m: re.Match) -> str:
    """`a.b\\overline{c}` as an exact `\\frac{p}{q}` (e.g. 0.1\\overline{6} = 1/6)."""
    whole, fixed, cycle = m.group(1) or "0", m.group(2), m.group(3)
    from fractions import Fraction

    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(cycle), (10 ** len(cycle) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


_BOUND = r"(-?(?:[\d.]+|\\frac\{[^{}]*\}\{[^{}]*\}|\\sqrt\{?[^{}]*\}?|\\pi|[\d.]*\\sqrt\{[^{}]*\}|\\infty)+)"
_OP = r"\s*(\\le|<)\s*"
_CHAINED = re.compile(rf"^{_BOUND}{_OP}[a-zA-Z]{_OP}{_BOUND}$")


def _chained_to_interval(s: str) -> str:
    """`-2 \\le x < 3` (constant bounds, one variable) -> the interval `[-2, 3)`."""
    m = _CHAINED.match(s.strip())
    if not m:
        return s
    lo, op1, op2, hi = m.group(1), m.group(2), m.group(3), m.group(4)
    closed_lo, closed_hi = op1 != "<", op2 != "<"
    return ("[" if closed_lo else "(") + f"{lo}, {hi}" + ("]" if closed_hi else ")")


def _join_alternatives(s: str) -> str:
    """`2 and -3`, `x=2 \\text{ or } x=-3`, `21, 36, and 82` -> `2, -3` / `x=2, x=-3` / `21, 36, 82`, when
    every piece is math: an enumeration stays one list of all its items, however it is joined."""
    parts = [p.strip().strip(",;").strip() for p in _JOINER.split(s)]
    if len(parts) < 2 or any(not p or re.search(r"[a-zA-Z]{2,}", re.sub(r"\\[a-zA-Z]+", "", p)) for p in parts):
        return s
    return ", ".join(parts)


def clean_answer(raw: str) -> CleanAnswer:
    s = unicodedata.normalize("NFKC", raw)
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = strip_math_delimiters(s.strip())
    if "\\boxed" in s or "\\fbox" in s:
        s = last_boxed(s) or s
    s = strip_math_delimiters(s.strip())
    s = s.replace("\\displaystyle", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\dbinom", "\\binom").replace("\\tbinom", "\\binom")
    s = _DIGIT_GROUP.sub("", s)
    s = _REPEATING.sub(_repeating_to_fraction, s)
    for pattern, spelling in _RELATIONS:
        s = re.sub(pattern, lambda _: spelling, s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\s*\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\quad|\\qquad", " ", s).replace("~", " ")  # not the row break \\
    s = s.replace("{,}", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    percent = bool(re.search(r"\\?%", s) or _PERCENT_WORD.search(s))
    s = _PERCENT_WORD.sub("", re.sub(r"\\?%", "", s))
    s = s.replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    if m := _WHOLE_TEXT.match(s):
        s = m.group(1).strip()
    s = _TRAILING_UNIT_TEXT.sub("", s).strip()
    s = _TRAILING_UNIT_WORD.sub("", s).strip()
    s = re.sub(r"\s+(?:dollars?|degrees?)$", "", s)
    if (m := _LEADING_VAR.match(s)) and "=" not in s[m.end():] and s[m.end():].strip():
        s = s[m.end():].strip()
    s = _join_alternatives(s)
    s = _chained_to_interval(s)
    if m := _CHOICE.match(s):
        s = m.group(1).upper()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = _DECIMAL_COMMA.sub(r"\1.\2", s)
    return CleanAnswer(s.strip(), percent)


def canonical_text(latex: str) -> str:
    """A key for plain string equality: no whitespace (a command keeps its separating space)."""
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\0", latex)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    return re.sub(r"\\text\{([^{}]*)\}", r"\1", s)


_PROSE_WORD = re.compile(r"(?:^|\s)[a-zA-Z]{2,}(?=$|\s|[.,;:!?])")
_NUM = r"-?(?:\d+(?:\.\d+)?|\.\d+|\\frac\{[^{}]*\}\{[^{}]*\})"
# numbers joined as a list or as alternatives, up to the text's last number: `4 or 5`, `7, 8, and 2`
_ITEM = rf"(?:[a-zA-Z]\s*=\s*)?{_NUM}"  # `4` or `x = 4`
_TRAILING_ENUMERATION = re.compile(
    rf"{_ITEM}(?:\s*(?:,\s*(?:(?:and|or)(?![a-zA-Z]))?|;|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z]))\s*{_ITEM})+(?=\D*$)")
_MEMBER_OF = re.compile(r"^[a-zA-Z]\s*(?:\\in|=)\s*")


def is_prose(text: str) -> bool:
    """Words, not only math: `so the sum is 10`, `He ran 5`; not `2ab`, `\\frac{a}{b}` or `x = 2`."""
    return bool(_PROSE_WORD.search(re.sub(r"\\[a-zA-Z]+", " ", text))) and bool(re.search(r"\s", text.strip()))


def answer_items(latex: str) -> int:
    """How many values a cleaned answer gives: 1 for a single value (number, expression, relation,
    matrix, union), the item count for a list, set, tuple or interval (`2, 3`, `\\{2, 3\\}`, `(2, 3]`,
    `x \\in [2, 3]`). In prose, the numbers joined as a list or as alternatives at its end (`x is 4 or
    5`: 2). A list never equals a single value it contains, so the grader compares these counts first."""
    s = latex.strip()
    if is_prose(s):
        m = None
        for m in _TRAILING_ENUMERATION.finditer(s):
            pass
        return len(re.findall(_NUM, m.group(0))) if m else 1
    s = _MEMBER_OF.sub("", s).replace("\\{", "{").replace("\\}", "}")
    depth, outer = 0, False
    for i, c in enumerate(s):  # one bracket pair around the whole answer is its set/tuple/interval
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0:
            outer = i == len(s) - 1 and s[:1] in "([{" and len(s) > 1
            break
    if outer:
        s = s[1:-1]
    depth, items = 0, 1
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        items += depth == 0 and c in ",;"
    return items
