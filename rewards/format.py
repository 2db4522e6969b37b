"""Format rewards for the R1-Zero template (`<think> ... </think> <answer> ... </answer>`) and R1's
readable pattern (the reasoning closes with a short summary)."""

from __future__ import annotations

import re

_STRICT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)
_LENIENT = re.compile(r"<think>(?P<think>.*?)</think>.*?<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SUMMARY_OPENERS = ("so", "therefore", "thus", "hence", "in summary", "in conclusion", "to summarize", "summary",
                   "final answer", "所以", "因此", "综上")
_PIECE_BREAK = re.compile(r"\n+| ; |(?<=[.!?。])\s+")


def _with_open_think(completion: str, think_in_prompt: bool) -> str:
    # When the prompt already ends with "<think>", the completion starts inside the thought.
    return "<think>" + completion if think_in_prompt and "<think>" not in completion[:32] else completion


def format_strict(completion: str, think_in_prompt: bool = False) -> float:
    """1.0 iff the text is exactly one think block then one answer block, both non-empty."""
    text = _with_open_think(completion, think_in_prompt)
    m = _STRICT.match(text)
    if m is None or any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    return float(bool(m["think"].strip()) and bool(m["answer"].strip()))


def format_lenient(completion: str, think_in_prompt: bool = False) -> float:
    """1.0 iff a think block is followed somewhere by a non-empty answer block (text around allowed)."""
    m = _LENIENT.search(_with_open_think(completion, think_in_prompt))
    return float(m is not None and bool(m["answer"].strip()))


def chain_of_thought(completion: str) -> str:
    """The `<think>` content; without tags, the text before `<answer>` (or all of it)."""
    m = re.search(r"<think>(.*?)(?:</think>|\Z)", completion, re.DOTALL)
    if m:
        return m.group(1)
    return completion.split("<answer>", 1)[0]


def closing_summary(completion: str) -> bool:
    """The chain of thought closes with a summary, R1's readable pattern (reasoning, then a short
    summary): it has at least two pieces (split at line breaks, " ; " and sentence ends) and the
    last one opens with a summary word ("so 47 + 85 = 132", "Therefore, ...")."""
    pieces = [p.strip() for p in _PIECE_BREAK.split(chain_of_thought(completion)) if p.strip()]
    if len(pieces) < 2:
        return False
    last = pieces[-1].lower().lstrip("*#_ ")
    return any(last.startswith(o) and (len(last) == len(o) or not last[len(o)].isalpha()) for o in SUMMARY_OPENERS)
