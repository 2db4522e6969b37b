"""Final-answer extraction: R1-Zero `<answer>` tags, the last `\\boxed{}`, GSM8K `#### n` golds."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "gsm8k", "last_number")


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
    found: list[tuple[int, str]] = []
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
                    found.append((at, text[j + 1:end]))
                    start = end + 1
            elif cmd == "\\boxed" and j < len(text) and text[j].isalnum() and j > at + len(cmd):
                found.append((at, text[j]))  # `\boxed 5`: one token argument
    return [s for _, s in sorted(found)]


def last_boxed(text: str) -> str | None:
    boxes = find_boxed(text)
    return boxes[-1].strip() if boxes else None


def extract_gsm8k_gold(answer_field: str) -> str | None:
    """The number after `####` in a GSM8K worked solution, thousands commas removed."""
    m = list(_GSM8K_GOLD.finditer(answer_field))
    if not m:
        return None
    return m[-1].group(1).replace(",", "").strip() or None


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    n = nums[-1]
    return n.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", n) else n.rstrip(",")


def answer_tag(text: str) -> str | None:
    m = _ANSWER_TAG.findall(text)
    return m[-1].strip() if m else None


def extract_answer(text: str, mode: str = "auto", fallback: str | None = None) -> str | None:
    """Final answer of a completion, or None.

    mode "auto": the `<answer>` content (its last `\\boxed{}` if it has one), else the last
    `\\boxed{}`; then `fallback` ("last_number" or None). The other modes use one rule only.
    An empty answer (`<answer> </answer>`) is None: nothing was answered.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extract mode {mode!r}; use one of {EXTRACT_MODES}")
    if fallback not in (None, "last_number"):
        raise ValueError(f"unknown fallback {fallback!r}; use None or 'last_number'")
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
            result = last_boxed(tagged) or tagged
    if not result and mode in ("auto", "boxed"):
        result = last_boxed(text)
    if not result and fallback == "last_number":
        result = last_number(text)
    return result or None
