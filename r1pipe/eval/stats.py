"""How sure an evaluation number is, as pure functions.

- wilson_interval: the Wilson score interval of a proportion (e.g. pass@1 over n problems): the p
  whose normal test against the observed share is not rejected at z, so it stays inside [0, 1] and is
  not empty at 0 or n successes, unlike the plain p +- z * sqrt(p (1 - p) / n).
- paired_difference: two models scored on the same problems; the mean of the per-problem differences
  a_i - b_i with the paired normal interval mean +- z * s / sqrt(n), s the sample standard deviation of
  the differences (n - 1 in its denominator).
- sign_test: the exact two-sided p-value of a split of discordant problems (solved by one model only)
  under a fair coin; on 0/1 scores this is McNemar's exact test.
- paired_comparison: both of the above for two models' per-problem scores, as one JSON-ready dict.

Z95 is the two-sided 95% normal quantile as reported (1.96).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.96


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of successes / n; successes may be fractional (a mean score
    over samples per problem, times n). (0.0, 1.0) when n is 0: nothing is known."""
    if n < 0 or not 0.0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    scale = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over n paired problems and its interval; low = high = nan when n < 2 (no spread to measure)."""

    n: int
    difference: float
    low: float
    high: float


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> PairedDifference:
    """The mean of a[i] - b[i] (a[i], b[i]: two models' scores on problem i) with the paired normal interval
    mean +- z * s / sqrt(n), s the sample standard deviation of the differences. A ValueError when a and b
    differ in length or are empty."""
    if len(a) != len(b):
        raise ValueError(f"paired scores must cover the same problems: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("no paired problems")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of `wins` against `losses` (ties already left out) under a fair coin:
    2 * P(X <= min(wins, losses)) for X ~ Binomial(wins + losses, 1/2), at most 1; 1.0 with no discordant pair."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(a: Sequence[float], b: Sequence[float], z: float = Z95) -> dict[str, float | int | None]:
    """Two models' scores on the same problems: n, the mean difference a - b with its paired interval (low and
    high None when n < 2), the problems a scored higher on (a_only) and b did (b_only), and their sign-test p-value."""
    diff = paired_difference(a, b, z)
    a_only, b_only = sum(p > q for p, q in zip(a, b)), sum(q > p for p, q in zip(a, b))
    return {"n": diff.n, "difference": diff.difference, "low": None if math.isnan(diff.low) else diff.low,
            "high": None if math.isnan(diff.high) else diff.high, "a_only": a_only, "b_only": b_only,
            "p_value": sign_test(a_only, b_only)}
