"""Final-answer extraction: R1-Zero `<answer>` tags, the last `\\boxed{}` (with boxes listed just
before it), GSM8K `#### n`, a stated "the answer is ...", and optional fallbacks (last number,
last math span). The one extractor of the project: the accuracy reward, eval scoring and
`math_equal` (for whole responses on either side) all use `extract_answer`."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
# "The (final) answer is $7$." / "Answer: 7": the statement, up to the end of its sentence or line
_STATED = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=|equals)\s*:?\s*(.+?)\s*(?:\.\s|\.?\s*\n|\.?\s*$)",
    re.IGNORECASE | re.DOTALL)
# $...$, $$...$$, \(...\), \[...\]: spans of math in prose
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# what may stand between several boxed answers given together ("\boxed{2} and \boxed{-3}")
_BOX_JOINER = re.compile(r"[\s$,;]*(?:,|;|and|or|\\text\{\s*(?:and|or)\s*\}|\\quad|\\qquad)?[\s$,;]*|\s*", re.IGNORECASE)

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "gsm8k", "last_number")
FALLBACKS = (None, "last_number", "last_math")


def _balanced(text: str, open_at: int) -> int | None:
    """Index of the brace closing the one at open_at, or None when unbalanced."""
    depth = 0
    i = open_at
    while i < len(text):
        c = text[i]
        if c == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxed(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` / `\\fbox{...}` (nested braces kept), in order."""
    return [content for _, _, content in _boxes(text)]


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete box, in order of start."""
    found: list[tuple[int, int, str]] = []
    for cmd in _BOX_COMMANDS:
        start = 0
        while (at := text.find(cmd, start)) != -1:
            j = at + len(cmd)
            start = j
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                end = _balanced(text, j)
                if end is not None:
                    found.append((at, end + 1, text[j + 1:end]))
                    start = end + 1
            elif cmd == "\\boxed" and j < len(text) and text[j].isalnum() and j > at + len(cmd):
                found.append((at, j + 1, text[j]))  # `\boxed 5`: one token argument
    return sorted(found)


def _last_group(text: str, spans: list[tuple[int, int, str]]) -> str | None:
    """The last span's content; spans given together with it (only separators such as `,` `and`
    `or` between them, as in `\\boxed{2} and \\boxed{-3}`) become one list `2, -3`."""
    if not spans:
        return None
    group = [spans[-1]]
    for span in reversed(spans[:-1]):
        if span[1] > group[0][0] or not _BOX_JOINER.fullmatch(text[span[1]:group[0][0]]):
            break
        group.insert(0, span)
    parts = [c.strip() for _, _, c in group if c.strip()]
    return ", ".join(parts) if parts else spans[-1][2].strip()


def last_boxed(text: str) -> str | None:
    """The last box's content, with the boxes listed right before it (see `_last_group`)."""
    return _last_group(text, _boxes(text))


def extract_gsm8k_gold(answer_field: str) -> str | None:
    """The number after `####` in a GSM8K worked solution, thousands commas removed."""
    m = list(_GSM8K_GOLD.finditer(answer_field))
    if not m:
        return None
    return m[-1].group(1).replace(",", "").strip() or None


def gold_answer(text: str) -> str:
    """A gold answer as the accuracy reward compares with it: a raw GSM8K worked solution ('... #### 42')
    reduced to what follows '####', any other text as it is."""
    return (extract_gsm8k_gold(text) or text) if "####" in text else text


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    n = nums[-1]
    return n.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", n) else n.rstrip(",")


def _last_statement(text: str) -> re.Match | None:
    found = None
    for found in _STATED.finditer(text):
        pass
    return found


def _statement_value(m: re.Match) -> str | None:
    """The stated answer: its one math span, or the statement with every span unwrapped (`$4$ or $5$`
    -> `4 or 5`, which stays the two alternatives it is)."""
    stated = m.group(1).strip()
    spans = [next(g for g in x.groups() if g is not None) for x in _MATH_SPAN.finditer(stated)]
    if len(spans) == 1 and _MATH_SPAN.fullmatch(stated.rstrip(".")):
        return spans[0].strip() or None
    unwrapped = _MATH_SPAN.sub(lambda x: next(g for g in x.groups() if g is not None).strip(), stated)
    return unwrapped.strip("$ ") or None


def stated_answer(text: str) -> str | None:
    """What follows the last "the answer is" / "Answer:"; its math span when it has one."""
    m = _last_statement(text)
    return _statement_value(m) if m else None


def boxed_or_stated(text: str) -> str | None:
    """The last box (with the boxes listed right before it), unless an explicit final-answer statement
    ("The final answer is $10,455$") comes after every box: then that statement is the answer."""
    boxes = _boxes(text)
    m = _last_statement(text)
    if m and (not boxes or m.start() >= boxes[-1][1]):
        value = _statement_value(m)
        if value:
            return value
    return _last_group(text, boxes)


def last_math(text: str) -> str | None:
    """The last `$...$` / `\\(...\\)` / `\\[...\\]` span with something in it (with the spans
    listed right before it, as for boxes)."""
    spans = [(x.start(), x.end(), next(g for g in x.groups() if g is not None)) for x in _MATH_SPAN.finditer(text)]
    return _last_group(text, [x for x in spans if x[2].strip()])


def strip_math_delimiters(s: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x` (one outer pair); anything else unchanged."""
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            return s[len(left):len(s) - len(right)].strip()
    return s


def is_bare_answer(text: str) -> bool:
    """No box, tag, `####`, stated answer, or math span inside prose: the text is the answer itself."""
    t = strip_math_delimiters(text.strip())
    markers = ("\\boxed", "\\fbox", "<answer>", "####", "$", "\\(", "\\[")
    return not any(m in t.replace("\\$", "") for m in markers) and not _STATED.search(t)


def final_answer(text: str) -> str:
    """The answer that a text gives, for grading either side of a pair: the text itself when it is a
    bare answer (`\\frac12`, `$7$`, `40 percent`), else `extract_answer(text, "auto", "last_math")`
    (a whole response, a sentence, a worked solution ending in a box)."""
    if is_bare_answer(text):
        return text
    return extract_answer(text, "auto", fallback="last_math") or text


def answer_tag(text: str) -> str | None:
    m = _ANSWER_TAG.findall(text)
    return m[-1].strip() if m else None


def extract_answer(text: str, mode: str = "auto", fallback: str | None = None) -> str | None:
    """Final answer of a completion, or None.

    mode "auto": the `<answer>` content (its last `\\boxed{}` if it has one), else the last
    `\\boxed{}` (with the boxes listed right before it), else a GSM8K `#### n` line, else a stated
    "the answer is X" / "Answer: X"; a stated answer that comes after every box wins over the boxes
    (in the `<answer>` content too); then `fallback`: "last_number" (the last number in the
    text), "last_math" (the last `$...$` span, else the last number) or None. The other modes use
    one rule only. An empty answer (`<answer> </answer>`) is None: nothing was answered.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extract mode {mode!r}; use one of {EXTRACT_MODES}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; use one of {FALLBACKS}")
    if not text:
        return None
    if mode == "gsm8k":
        return extract_gsm8k_gold(text)
    if mode == "last_number":
        return last_number(text)
    result: str | None = None
    if mode in ("auto", "answer_tag"):
        tagged = answer_tag(text)
        if tagged is not None:
            result = (boxed_or_stated(tagged) if mode == "auto" else last_boxed(tagged)) or tagged
    if not result and mode == "boxed":
        result = last_boxed(text)
    if not result and mode == "auto":
        result = boxed_or_stated(text)
        result = result or (extract_gsm8k_gold(text) if "####" in text else None)
    if not result and fallback == "last_math":
        result = last_math(text)
    if not result and fallback in ("last_number", "last_math"):
        result = last_number(text)
    return result or None
