"""Math answer equivalence: normalisation and exact fast paths first, math-verify (sympy) last.

Order: (1) each side's answer (`final_answer`: a bare answer as is, a whole response or sentence
through `extract_answer`), (2) surface normalisation and text equality ("equal" only), then the
answer's shape ("unequal" when one side is a single value and the other a list of several), (3) the exact
evaluator (`fastmath`: "equal", or "unequal" only for fully parsed values of the same kind), (4)
math-verify on the cleaned pair, then, if that says unequal, on the texts as given (its default
parse; a bare answer wrapped in `$...$`). A fast path never says "unequal" where math-verify would be asked.

`verify_math` returns a `Verdict` (how it was decided, timeouts and errors); `math_equal` is the
boolean. Verdicts are cached (an LRU keyed by the given pair); timeouts are not cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import LRUCache
from .extract import final_answer, is_bare_answer
from .fastmath import Undecided, fast_equal
from .normalize import answer_items, canonical_text, clean_answer, is_prose
from .verifier import VerifierPool, default_pool

DEFAULT_TIMEOUT_S = 5.0
_MAX_ANSWER_CHARS = 2000  # an extracted answer longer than this is compared as text
_MAX_TEXT_CHARS = 50_000  # longer texts are not handed to math-verify whole


@dataclass(frozen=True)
class Verdict:
    equal: bool
    method: str  # "empty" | "text" | "shape" | "fast" | "math_verify" | "cache" | "too_long" | "error"
    timed_out: bool = False
    error: str | None = None


_cache: LRUCache[tuple[str, str], Verdict] = LRUCache(200_000)


def clear_cache() -> None:
    _cache.clear()


def _decide(pred: str, gold: str, timeout_s: float, pool: VerifierPool | None) -> Verdict:
    ap, ag = final_answer(pred), final_answer(gold)
    if len(ap) > _MAX_ANSWER_CHARS or len(ag) > _MAX_ANSWER_CHARS:
        return Verdict(ap.strip() == ag.strip(), "too_long")
    p, g = clean_answer(ap), clean_answer(ag)
    if not p.latex:
        return Verdict(False, "empty")
    kp, kg = canonical_text(p.latex), canonical_text(g.latex)
    if kp == kg or (kp.replace(" ", "").isalpha() and kp.casefold() == kg.casefold()):
        return Verdict(True, "text")
    ip, ig = answer_items(p.latex), answer_items(g.latex)
    if ip != ig and 1 in (ip, ig):
        # a list or set of alternatives never equals one value it contains (`21, 36, and 82` vs `82`):
        # final, so no later reading (math-verify takes a bare list's last number) can let a hedge score
        return Verdict(False, "shape")
    try:
        return Verdict(fast_equal(p.latex, g.latex, percent=p.percent or g.percent), "fast")
    except (Undecided, RecursionError):
        pass
    pool = pool or default_pool()
    reply = pool.verify(f"${p.latex}$", f"${g.latex}$", timeout_s)
    given = (_as_given(pred), _as_given(gold))
    asked = tuple(canonical_text(x) for x in (f"${p.latex}$", f"${g.latex}$"))
    if (not reply.equal and not reply.timed_out and max(len(pred), len(gold)) <= _MAX_TEXT_CHARS
            and tuple(canonical_text(x) for x in given) != asked):
        # cleaning and extraction are lossy at the edges (a unit that was a variable, prose we did not
        # read): math-verify's own reading of the texts as given has the last word
        raw = pool.verify(*given, timeout_s)
        if raw.equal or raw.timed_out:
            return Verdict(raw.equal, "math_verify", raw.timed_out, raw.error)
    return Verdict(reply.equal, "math_verify", reply.timed_out, reply.error)


def _as_given(text: str) -> str:
    """The text for math-verify's own parse: a bare math answer inside `$...$`; prose (`so the sum is
    10`) and anything else as it is, so math-verify reads it as text."""
    t = text.strip()
    if not is_bare_answer(t) or t.startswith(("$", "\\(", "\\[")) or is_prose(t):
        return t
    return f"${t}$"


def verify_math(pred: str | None, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                pool: VerifierPool | None = None) -> Verdict:
    """Is `pred` the same mathematical answer as `gold`? Never raises; bounded by timeout_s."""
    if pred is None or not pred.strip():
        return Verdict(False, "empty")
    key = (pred, gold)
    hit = _cache.get(key)
    if hit is not None:
        return Verdict(hit.equal, "cache", False, hit.error)
    try:
        verdict = _decide(pred, gold, timeout_s, pool)
    except Exception as exc:  # a bug in a fast path must cost one answer, never the run
        verdict = Verdict(False, "error", False, f"{type(exc).__name__}: {exc}")
    if not verdict.timed_out:
        _cache.put(key, verdict)
    return verdict


def math_equal(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return verify_math(pred, gold, timeout_s).equal
