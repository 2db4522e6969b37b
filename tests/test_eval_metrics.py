"""The R1 protocol's numbers against hand-computed values."""
from math import comb

import pytest

from r1pipe.eval.metrics import cons_at_k, majority_vote, mean_pass_at_1, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 1, 0.25),  # pass@1 is the share correct
        (10, 0, 5, 0.0),
        (3, 2, 2, 1.0),  # fewer wrong samples than k: a correct one is always drawn
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_pass_at_1_and_k_over_problems():
    scores = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert mean_pass_at_1(scores) == pytest.approx((0.5 + 1 + 0) / 3)
    # problem 1: 1 - C(2,2)/C(4,2) = 5/6
    assert mean_pass_at_k(scores, 2) == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert mean_pass_at_k(scores, 4) == pytest.approx(2 / 3)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["4", None, "5", "5"]) == 2
    assert majority_vote(["a", "b"]) == 0
    assert majority_vote(["b", "a", "a", "b"]) == 0
    assert majority_vote([None, " ", None]) is None
    assert majority_vote(["x + 1", "x+1", "2"]) == 0  # spacing does not split a vote


def test_cons_at_k_hand_example():
    answers = [["4", "4", "5"], ["1", "2", "2"], [None, None, None], ["3 ", "3", "7"], ["9", "8"]]
    scores = [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1]]
    # voted: "4" right, "2" wrong, nothing, "3" wrong, tie 9/8 -> "9" wrong
    assert cons_at_k(answers, scores) == pytest.approx(1 / 5)
    assert cons_at_k([["7", "7", "1"]], [[1, 1, 0]]) == 1.0
