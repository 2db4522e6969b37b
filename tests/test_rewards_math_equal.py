"""`math_equal` against the hand-labelled set (tests/data/math_equal_cases.py) and a generated
property: on the shipped suites' golds paired with rewritten forms of themselves, no pair that
math-verify (default config: `verify(parse(gold), parse(pred))`) calls equal is called unequal."""

from __future__ import annotations

import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from r1pipe.eval.suites import integer_gold
from r1pipe.rewards import extract_gsm8k_gold
from r1pipe.rewards import build_reward_fn, math_equal
from r1pipe.rewards.extract import is_bare_answer

HERE = Path(__file__).resolve().parent
SUITES = HERE.parent / "r1pipe" / "eval" / "suites_data"


def _labelled():
    spec = importlib.util.spec_from_file_location("math_equal_cases", HERE / "data" / "math_equal_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _labelled()


def test_labelled_set_at_least_99_percent_and_misses_explained():
    cases, misses = CASES.CASES, CASES.KNOWN_MISSES
    assert len(cases) >= 150 and sum(not equal for *_, equal in cases) >= 40  # negatives: the test can fail
    wrong = {(p, g) for _, p, g, equal in cases if math_equal(p, g) is not equal}
    assert wrong <= set(misses), f"unexplained misses: {sorted(wrong - set(misses))}"
    assert 1 - len(wrong) / len(cases) >= 0.99


WHOLE_RESPONSES = [c for c in CASES.CASES if not is_bare_answer(c[1])]


def test_enough_whole_responses():
    assert len(WHOLE_RESPONSES) >= 40


@pytest.mark.parametrize("kind,pred,gold,equal", WHOLE_RESPONSES)
def test_whole_responses_score_the_same_through_the_accuracy_reward(kind, pred, gold, equal):
    """A whole-response pred (a completion) scores its label through the accuracy reward too, which
    extracts with the same `extract_answer` (here with fallback "last_math", as math_equal does)."""
    if (pred, gold) in CASES.KNOWN_MISSES:
        pytest.skip(CASES.KNOWN_MISSES[(pred, gold)])
    reward = build_reward_fn({"accuracy": 1.0}, fallback="last_math")
    assert reward(pred, {"answer": gold}).total == float(equal)


# -- generated property test over the shipped golds

def suite_golds() -> list[str]:
    golds = [str(json.loads(line)["answer"]).strip() for line in (SUITES / "math500" / "test.jsonl").open()]
    golds += [extract_gsm8k_gold(json.loads(line)["answer"]) for line in (SUITES / "gsm8k" / "test.jsonl").open()]
    for suite in ("aime24", "amc23"):
        golds += [integer_gold(json.loads(line)["answer"]) for line in (SUITES / suite / "test.jsonl").open()]
    return golds


_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def exact_other_form(gold: str) -> str | None:
    """The same number written the other way: a terminating decimal as a fraction and back."""
    if re.fullmatch(r"-?\d*\.\d+", gold):
        f = Fraction(gold)
        return f"\\frac{{{f.numerator}}}{{{f.denominator}}}" if f.denominator != 1 else str(f.numerator)
    if re.fullmatch(r"-?\d+", gold):
        return f"\\frac{{{2 * int(gold)}}}{{2}}"
    if m := _FRACTION.fullmatch(gold):
        f = Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
        if 10 ** 8 % f.denominator == 0:
            return str(float(f))
        return f"{f.numerator}/{f.denominator}"
    return None


def rewrites(gold: str) -> list[str]:
    """Equivalent surface forms of gold: `$g$`, `\\boxed{g}`, spaced out, and an exact other form."""
    forms = [f"${gold}$", f"\\boxed{{{gold}}}", f"The answer is ${gold}$."]
    if "\\text" not in gold:  # spacing inside \text{} would change the text
        # not a thousands separator: `58,500` spaced out would be the list `58, 500`
        forms.append(re.sub(r"\s*([+=<>]|,(?!\d{3}(?!\d)))\s*", r" \1 ", gold).strip())
    other = exact_other_form(gold)
    if other is not None:
        forms.append(other)
    return forms


def check_property(golds: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pairs math-verify calls equal and math_equal does not, all pairs math_equal calls unequal)."""
    from math_verify import parse, verify

    broken, unequal = [], []
    for gold in golds:
        for pred in rewrites(gold):
            if not math_equal(pred, gold):
                unequal.append((pred, gold))
                if verify(parse(gold), parse(pred)):
                    broken.append((pred, gold))
    return broken, unequal


def test_property_math_verify_equal_implies_math_equal_on_a_subset():
    golds = suite_golds()
    subset = golds[::20]  # deterministic: every 20th gold of MATH-500, GSM8K, AIME 24, AMC 23
    assert len(subset) >= 90
    broken, unequal = check_property(subset)
    assert broken == []
    assert unequal == []  # stronger: every rewrite is equivalent by construction


@pytest.mark.slow
def test_property_math_verify_equal_implies_math_equal_all_golds():
    broken, unequal = check_property(suite_golds())
    assert broken == []
    assert unequal == []
