"""A hedge never scores: a list or a set of alternatives that merely contains the gold is graded unequal,
through `math_equal` and through the accuracy reward on a whole response.

Generated property: real single-value golds (MATH-500, GSM8K, AIME 24, AMC 23) placed among wrong values,
first, in the middle or last, joined in every way an answer list is written (commas, `and`, `or`, the
Oxford comma, `\\text{ and }`, `;`, `x = a or x = b`, a set `\\{...\\}`, separate boxes), inside `$...$`,
`\\boxed{}`, a stated answer and `<answer>` tags. And the other way round: one member of a list gold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1pipe.eval.suites import integer_gold
from r1pipe.rewards import extract_gsm8k_gold
from r1pipe.rewards import build_reward_fn, math_equal
from r1pipe.rewards.normalize import answer_items, clean_answer

SUITES = Path(__file__).resolve().parent.parent / "r1pipe" / "eval" / "suites_data"


def single_value_golds() -> list[str]:
    """Every 10th MATH-500 gold that is one value, every 40th GSM8K gold, every AIME 24 and 5th AMC 23 gold."""
    math500 = [str(json.loads(line)["answer"]).strip() for line in (SUITES / "math500" / "test.jsonl").open()]
    gsm8k = [extract_gsm8k_gold(json.loads(line)["answer"]) for line in (SUITES / "gsm8k" / "test.jsonl").open()]
    aime = [integer_gold(json.loads(line)["answer"]) for line in (SUITES / "aime24" / "test.jsonl").open()]
    amc = [integer_gold(json.loads(line)["answer"]) for line in (SUITES / "amc23" / "test.jsonl").open()]
    golds = math500[::10] + gsm8k[::40] + aime + amc[::5]
    return [g for g in dict.fromkeys(golds) if answer_items(clean_answer(g).latex) == 1]


def wrong_values(gold: str) -> list[str]:
    """Two values that are not the gold: near it for integers, fixed ones otherwise."""
    if gold.lstrip("-").isdigit():
        n = int(gold)
        return [str(n + 1), str(2 * n + 7)]
    return ["17", "\\frac{2}{3}"]


def joined(items: list[str]) -> list[str]:
    """The items as one answer, written every way an enumeration is written."""
    *head, last = items
    pairs = ", ".join(head)
    return [
        ", ".join(items),
        f"{pairs}, and {last}" if len(items) > 2 else f"{pairs} and {last}",
        f"{pairs}, or {last}" if len(items) > 2 else f"{pairs} or {last}",
        f"{pairs} or {last}",
        " \\text{ and } ".join(items),
        " \\text{ or } ".join(items),
        "; ".join(items),
        " \\text{ or } ".join(f"x = {v}" for v in items),
        "\\{" + ", ".join(items) + "\\}",
    ]


def wrapped(answer: str, items: list[str]) -> list[str]:
    """Whole responses around one written enumeration (and the items as separate boxes)."""
    think = "<think>Let me check each case.</think> "
    return [
        f"${answer}$",
        f"\\boxed{{{answer}}}",
        f"The answer is ${answer}$.",
        f"{think}<answer>{answer}</answer>",
        f"{think}<answer>${answer}$</answer>",
        f"{think}<answer>\\boxed{{{answer}}}</answer>",
        f"{think}<answer>" + ", ".join(f"\\boxed{{{v}}}" for v in items) + "</answer>",
        "So it is " + " or ".join(f"$\\boxed{{{v}}}$" for v in items) + ".",
    ]


def hedges(gold: str) -> list[str]:
    w1, w2 = wrong_values(gold)
    orders = [[gold, w1, w2], [w1, gold, w2], [w1, w2, gold], [gold, w1], [w1, gold]]
    return list(dict.fromkeys(text for items in orders for answer in joined(items) for text in wrapped(answer, items)))


GOLDS = single_value_golds()
REWARD = build_reward_fn({"accuracy": 1.0}, fallback="last_math")


def test_the_generated_set_is_large_and_its_wrong_values_are_wrong():
    assert len(GOLDS) >= 80
    for gold in GOLDS:
        assert not any(math_equal(w, gold) for w in wrong_values(gold)), gold
        assert math_equal(f"<answer>{gold}</answer>", gold), gold  # the gold alone does score: the test can fail


@pytest.mark.parametrize("gold", GOLDS)
def test_a_hedge_around_the_gold_never_grades_equal(gold):
    scored = [h for h in hedges(gold) if math_equal(h, gold)]
    assert scored == []
    rewarded = [h for h in hedges(gold) if REWARD(h, {"answer": gold}).total > 0]
    assert rewarded == []


@pytest.mark.parametrize("gold", GOLDS[::4])
def test_one_member_of_a_list_gold_never_grades_equal(gold):
    w1, w2 = wrong_values(gold)
    for answer in joined([w1, gold, w2]) + joined([gold, w1]):
        list_gold = f"${answer}$"
        for pred in (gold, f"${gold}$", f"\\boxed{{{gold}}}", f"<think>so</think> <answer>{gold}</answer>"):
            assert not math_equal(pred, list_gold), (pred, list_gold)
            assert REWARD(pred, {"answer": list_gold}).total == 0, (pred, list_gold)
