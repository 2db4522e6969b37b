"""r1pipe.eval.stats against hand-worked values (z = 1.96)."""
from __future__ import annotations

import math

import pytest

from r1pipe.eval.stats import paired_difference, sign_test, wilson_interval


def test_wilson_interval_hand_checked():
    # 8/10: p = 0.8, z^2/n = 0.38416; centre (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581 (the tables' 0.4902 to 0.9433)
    assert wilson_interval(8, 10) == pytest.approx((0.490157, 0.943319), abs=1e-6)
    # 0/10: centre = half = 0.19208 / 1.38416 = 0.138770; the interval starts at 0 and is not empty
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722460, 1.0), abs=1e-6)  # symmetric to 0/10
    assert wilson_interval(2.5, 5) == pytest.approx((1 - wilson_interval(2.5, 5)[1], 1 - wilson_interval(2.5, 5)[0]))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_paired_difference_hand_checked():
    # differences 1, 0, 0, 1: mean 0.5, sample sd sqrt(1 / 3) = 0.577350, half 1.96 * 0.577350 / 2 = 0.565803
    d = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert (d.n, d.difference) == (4, 0.5)
    assert (d.low, d.high) == pytest.approx((-0.065803, 1.065803), abs=1e-6)
    same = paired_difference([1, 0.5, 0], [0, -0.5, -1])  # every difference 1: no spread, a point interval
    assert (same.difference, same.low, same.high) == pytest.approx((1.0, 1.0, 1.0))
    one = paired_difference([1], [0])
    assert one.difference == 1.0 and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="no paired"):
        paired_difference([], [])


def test_sign_test_hand_checked():
    assert sign_test(2, 8) == sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(3, 1) == pytest.approx(2 * (1 + 4) / 16)
    assert sign_test(3, 3) == sign_test(0, 0) == 1.0
    assert 0.0 <= sign_test(0, 1500) < 1e-300  # large counts: exact integers, no overflow
    with pytest.raises(ValueError, match="counts"):
        sign_test(-1, 2)
