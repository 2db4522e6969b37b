"""Answer extraction and math equivalence against hand-checked cases."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from r1pipe.rewards import extract_answer, extract_gsm8k_gold, find_boxed, math_equal, verify_math
from r1pipe.rewards.verifier import VerifierPool

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "answer_equivalence_examples.jsonl"


def _shared_cases() -> list[dict]:
    if not SHARED.exists():
        return []
    return [json.loads(line) for line in SHARED.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not SHARED.exists(), reason="shared data not present")
def test_shared_equivalence_cases_all_pass():
    cases = _shared_cases()
    assert len(cases) >= 40
    wrong = [(c["pred"], c["gold"], c["equal"]) for c in cases if math_equal(c["pred"], c["gold"]) != c["equal"]]
    assert wrong == []


# (pred, gold, equal), each checked by hand
HAND_CHECKED = [
    ("\\text{(A)}", "A", True), ("(B)", "\\text{(B)}", True), ("B", "\\text{(C)}", False),
    ("10\\%", "0.1", True), ("0.1", "10\\%", True), ("50\\%", "\\frac{1}{2}", True), ("20\\%", "0.1", False),
    ("15", "15\\mbox{ cm}^2", True), ("15 cm", "15", True), ("5\\text{ inches}", "5", True), ("5 \\text{ feet}", "6", False),
    ("4\\sqrt{2}\\text{ units}", "4\\sqrt2", True),
    ("76^{\\circ}", "76", True), ("76°", "76^\\circ", True), ("77^\\circ", "76^\\circ", False),
    ("1,000,000", "1000000", True), ("1000001", "1,000,000", False), ("\\$1,000", "1000", True),
    ("k=3", "3", True), ("y=2x+3", "2x+3", True), ("x = 4", "5", False),
    ("2516_8", "2516_8", True), ("2517_8", "2516_8", False),
    ("(2,12)\\cup(12,102)", "(2,12) \\cup (12,102)", True), ("(2,12)\\cup(12,103)", "(2,12) \\cup (12,102)", False),
    ("[2,5)", "[2,5]", False), ("\\left[ 1, 2 \\right)", "[1,2)", True), ("(1,2)", "[1,2]", False), ("(2,1)", "(1,2)", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{1+\\sqrt5, 1-\\sqrt5, -2\\}", True), ("1, -2", "-2,1", True), ("1,-3", "-2,1", False),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("6+9i", "9i+6", True), ("6-9i", "6+9i", False), ("e^{i\\pi}", "-1", True),
    ("2\\frac{1}{2}", "\\frac{5}{2}", True), ("\\frac{33}{100}", "0.33", True), ("-\\frac{24}{25}", "-0.96", True),
    ("\\pi", "3.14", False), ("1/3", "0.333", False), ("2^{10}", "1024", True), ("10^{100}+1", "10^{100}", False),
    ("123456789012345678901", "123456789012345678902", False), ("\\sqrt[3]{27}", "3", True), ("4^{1/2}", "2", True),
    ("x^2+7x+10", "(x+5)(x+2)", True), ("x^2+7x+11", "(x+5)(x+2)", False), ("x", "y", False),
    ("\\cos x", "\\sin(x+\\pi/2)", True), ("\\infty", "-\\infty", False),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", False),
    ("tuesday", "\\text{Tuesday}", True), ("Monday", "Tuesday", False), ("\\text{no solution}", "No solution", True),
    ("$\\frac{1}{2}$", "0.5", True), ("\\(\\frac12\\)", "0.5", True), ("0.5.", "\\frac12", True), ("\\tfrac{1}{2}", "0.5", True),
    ("٣", "3", True), ("３", "3", True), ("", "3", False), ("   ", "3", False),
]


@pytest.mark.parametrize("pred,gold,equal", HAND_CHECKED)
def test_hand_checked_equivalences(pred, gold, equal):
    assert math_equal(pred, gold) is equal


def test_fast_paths_avoid_sympy_for_common_forms():
    for pred, gold in [("0.5", "\\frac{1}{2}"), ("\\sqrt{117}", "3\\sqrt{13}"), ("(x+1)^2", "x^2+2x+1"), ("1,000", "1000")]:
        assert verify_math(pred, gold).method in ("fast", "text", "cache")


def test_hard_timeout_works_in_threads():
    pool = VerifierPool(size=1)
    pool.warm_up()
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(verify_math, "9^{9^{9^{9}}}", "2", 1.0, pool)
            fast = ex.submit(verify_math, "\\frac{2}{4}", "0.5", 1.0, pool)
            v = slow.result()
        assert v.timed_out and not v.equal
        assert time.monotonic() - start < 1.0 + 2.0  # the deadline plus killing the process
        assert fast.result().equal
        assert pool.timeouts == 1
        # the pool replaced the killed process and still answers
        assert verify_math("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 30, pool).equal
    finally:
        pool.close()


def test_extract_answer_tag_boxed_and_fallback():
    assert extract_answer("<think>t</think> <answer> 42 </answer>") == "42"
    assert extract_answer("<think>t</think><answer>so \\boxed{7}</answer>") == "7"
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert extract_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("nested \\boxed{\\sqrt{\\frac{1}{2}}} end") == "\\sqrt{\\frac{1}{2}}"
    assert extract_answer("unbalanced \\boxed{3") is None
    assert extract_answer("no answer here 12") is None
    assert extract_answer("no answer here 1,234 and 12.5", fallback="last_number") == "12.5"
    assert extract_answer("cost is 1,234", fallback="last_number") == "1234"
    assert extract_answer("<answer></answer>") is None
    assert extract_answer("<answer>  </answer> \\boxed{5}") == "5"
    assert extract_answer("<answer>π/2 — ответ</answer>") == "π/2 — ответ"
    assert extract_answer("\\fbox{9}") == "9"
    assert extract_answer("") is None
    with pytest.raises(ValueError):
        extract_answer("x", mode="nope")


def test_find_boxed_order_and_gsm8k_gold():
    assert find_boxed("\\boxed{a} \\fbox{b} \\boxed{c}") == ["a", "b", "c"]
    assert extract_gsm8k_gold("She pays 3 * 4 = <<3*4=12>>12.\n#### 1,200") == "1200"
    assert extract_answer("work\n#### -7", mode="gsm8k") == "-7"
    assert extract_gsm8k_gold("no marker") is None
