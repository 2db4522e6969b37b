"""Language-consistency reward (DeepSeek-R1): the share of the chain of thought in the target language.

Words are counted by script: a Latin-script word counts for English (and other Latin-script
languages), each Han character counts as one word for Chinese, and so on. Math is not language:
LaTeX commands, `$...$` spans, numbers and symbols are removed before counting.
"""

from __future__ import annotations

import re
import unicodedata

# script predicates per target language (first letter of each word decides its script)
_SCRIPTS = {
    "latin": lambda ch: "LATIN" in unicodedata.name(ch, ""),
    "han": lambda ch: "CJK UNIFIED" in unicodedata.name(ch, "") or "CJK COMPATIBILITY IDEOGRAPH" in unicodedata.name(ch, ""),
    "kana": lambda ch: "HIRAGANA" in unicodedata.name(ch, "") or "KATAKANA" in unicodedata.name(ch, ""),
    "hangul": lambda ch: "HANGUL" in unicodedata.name(ch, ""),
    "cyrillic": lambda ch: "CYRILLIC" in unicodedata.name(ch, ""),
    "arabic": lambda ch: "ARABIC" in unicodedata.name(ch, ""),
    "greek": lambda ch: "GREEK" in unicodedata.name(ch, ""),
}
LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("latin",), "fr": ("latin",), "de": ("latin",), "es": ("latin",), "zh": ("han",),
    "ja": ("han", "kana"), "ko": ("hangul",), "ru": ("cyrillic",), "ar": ("arabic",), "el": ("greek",),
}
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[a-zA-Z]+", re.DOTALL)
_IDEOGRAPHIC = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def _script_of(ch: str) -> str | None:
    for name, test in _SCRIPTS.items():
        if test(ch):
            return name
    return None


def language_share(text: str, language: str = "en") -> float:
    """Fraction of words (CJK: characters) in the target language's script; 0.0 with no words."""
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; known: {sorted(LANGUAGE_SCRIPTS)}")
    target = LANGUAGE_SCRIPTS[language]
    text = _MATH.sub(" ", text)
    # Each ideograph or kana is a word of its own; the rest splits on non-letters.
    counts: dict[str | None, int] = {}
    for ch in _IDEOGRAPHIC.findall(text):
        s = _script_of(ch)
        counts[s] = counts.get(s, 0) + 1
    for word in _WORD.findall(_IDEOGRAPHIC.sub(" ", text)):
        if len(word) == 1 and word.isascii():  # a lone letter is a math variable, not a word
            continue
        s = _script_of(word[0])
        counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return sum(counts.get(s, 0) for s in target) / total
