"""Readability filters for rejection sampling (DeepSeek-R1: keep only readable chains of thought),
and the readability figures reported per stage.

Each filter is a named pure function `f(text, reference, **params) -> bool` (True: the response
passes); its parameters are set by name from a recipe, e.g.
`filters: {language_consistency: {min_share: 0.95}, length: {max_chars: 4000}}`.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .compose import has_tests, infer_domain
from .format import chain_of_thought, closing_summary, format_strict
from .language import LANGUAGE_SCRIPTS, _script_of, language_share

_CODE_LINE = re.compile(r"```|\bdef\s+\w+\s*\(|^\s*(?:class\s+\w+|import\s+\w+|from\s+\S+\s+import\s)", re.MULTILINE)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def language_consistency(text: str, reference: dict, language: str = "en", min_share: float = 0.95) -> bool:
    """At least min_share of the chain of thought's words are in the row's (else `language`'s) script."""
    return language_share(chain_of_thought(text), reference.get("language", language)) >= min_share


def scripts_of(text: str) -> set[str]:
    """The scripts of the letters in `text` (Latin, Han, Kana, Cyrillic, ...)."""
    out: set[str] = set()
    for word in _WORD.findall(text):
        for ch in word:
            s = _script_of(ch)
            if s is not None:
                out.add(s)
    return out


def no_mixed_scripts(text: str, reference: dict) -> bool:
    """All letters of the response belong to one language's scripts (Han + Kana count as Japanese)."""
    found = scripts_of(text)
    return len(found) <= 1 or any(found <= set(scripts) for scripts in LANGUAGE_SCRIPTS.values())


def length(text: str, reference: dict, min_chars: int = 1, max_chars: int = 16000) -> bool:
    """min_chars <= len(text) <= max_chars (0: no upper limit)."""
    n = len(text.strip())
    return n >= min_chars and (max_chars <= 0 or n <= max_chars)


def paragraph_length(text: str, reference: dict, max_chars: int = 3000, split: str = r"\n\s*\n") -> bool:
    """No paragraph (pieces between `split` matches) longer than max_chars."""
    return all(len(p.strip()) <= max_chars for p in re.split(split, text))


def no_repeated_paragraphs(text: str, reference: dict, min_chars: int = 8, split: str = r"\n\s*\n") -> bool:
    """No paragraph of at least min_chars occurs twice (whitespace-normalised)."""
    seen: set[str] = set()
    for p in re.split(split, text):
        key = " ".join(p.split())
        if len(key) < min_chars:
            continue
        if key in seen:
            return False
        seen.add(key)
    return True


def no_code_in_math(text: str, reference: dict) -> bool:
    """A response to a non-code row carries no code: no ``` fence, function definition, class or import line."""
    domain = reference.get("domain") or infer_domain(reference)
    if domain == "code" or (domain is None and has_tests(reference)):
        return True
    return _CODE_LINE.search(text) is None


def ends_with_summary(text: str, reference: dict) -> bool:
    """The chain of thought closes with a summary (r1pipe.rewards.format.closing_summary)."""
    return closing_summary(text)


FILTERS: dict[str, Callable[..., bool]] = {
    "language_consistency": language_consistency,
    "no_mixed_scripts": no_mixed_scripts,
    "length": length,
    "paragraph_length": paragraph_length,
    "no_repeated_paragraphs": no_repeated_paragraphs,
    "no_code_in_math": no_code_in_math,
    "ends_with_summary": ends_with_summary,
}


@dataclass(frozen=True)
class NamedFilter:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, text: str, reference: dict) -> bool:
        return bool(FILTERS[self.name](text, reference, **self.params))


def build_filters(spec: dict[str, dict[str, Any] | None]) -> list[NamedFilter]:
    """Filters by name with their parameters; an unknown name or parameter is a ValueError naming it."""
    out = []
    for name, params in spec.items():
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")
        params = dict(params or {})
        accepted = list(inspect.signature(FILTERS[name]).parameters)[2:]
        bad = [k for k in params if k not in accepted]
        if bad:
            raise ValueError(f"filter {name!r}: unknown parameter(s) {bad}; known: {accepted}")
        out.append(NamedFilter(name, params))
    return out


@dataclass
class Readability:
    """Readability figures of a set of responses."""

    format_compliance: float  # share with exactly <think> ... </think> <answer> ... </answer>
    language_consistency: float  # mean share of chain-of-thought words in the row's language
    mixed_script_share: float  # share of responses whose letters mix scripts
    summary_share: float  # share whose chain of thought closes with a summary (ends_with_summary)
    mean_length: float  # mean response length in tokens

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def readability(texts: Sequence[str], references: Sequence[dict], lengths: Sequence[int], language: str = "en") -> Readability:
    n = max(len(texts), 1)
    return Readability(
        format_compliance=sum(format_strict(t) for t in texts) / n,
        language_consistency=sum(language_share(chain_of_thought(t), r.get("language", language))
                                 for t, r in zip(texts, references)) / n,
        mixed_script_share=sum(not no_mixed_scripts(t, r) for t, r in zip(texts, references)) / n,
        summary_share=sum(ends_with_summary(t, r) for t, r in zip(texts, references)) / n,
        mean_length=sum(lengths) / n,
    )
