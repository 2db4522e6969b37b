"""The R1 evaluation protocol's numbers, as pure functions.

- pass@1: for each problem the mean score over its k samples, then the mean over problems
  (R1 paper, section 3: "pass@1 = 1/k sum p_i" with temperature 0.6, top-p 0.95).
- cons@k: per problem, a majority vote over the k extracted answers; the problem counts as solved
  when the winning answer is a correct one.
- pass@k (unbiased, Chen et al. 2021 "Evaluating Large Language Models Trained on Code"):
  1 - C(n - c, k) / C(n, k) for n samples of which c are correct, as a numerically stable product.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples (drawn without replacement
    from n, c of them correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(scores: Sequence[Sequence[float]], k: int) -> float:
    """Mean over problems of the unbiased pass@k; a sample is correct when its score >= 1."""
    values = [pass_at_k(len(s), sum(1 for x in s if x >= 1.0), k) for s in scores]
    return float(np.mean(values)) if values else 0.0


def mean_pass_at_1(scores: Sequence[Sequence[float]]) -> float:
    """pass@1 as the R1 paper reports it: mean over problems of the mean score over samples."""
    values = [float(np.mean(s)) for s in scores if len(s)]
    return float(np.mean(values)) if values else 0.0


def normalize_vote(answer: str) -> str:
    """Answers that differ only in spacing or a trailing period vote together."""
    return "".join(answer.split()).rstrip(".")


def majority_vote(
    answers: Sequence[str | None], key: Callable[[str], str] = normalize_vote
) -> int | None:
    """Index of a sample holding the most common answer (None answers do not vote); ties go to the
    answer seen first. None when no sample has an answer."""
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        group = key(answer)
        counts[group] = counts.get(group, 0) + 1
        first_index.setdefault(group, i)
    if not counts:
        return None
    best = max(counts, key=lambda g: (counts[g], -first_index[g]))
    return first_index[best]


def cons_at_k(answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]]) -> float:
    """Share of problems whose majority-voted answer is correct (the voted sample's score)."""
    if len(answers) != len(scores):
        raise ValueError("answers and scores must cover the same problems")
    solved = []
    for problem_answers, problem_scores in zip(answers, scores):
        winner = majority_vote(problem_answers)
        solved.append(0.0 if winner is None else float(problem_scores[winner] >= 1.0))
    return float(np.mean(solved)) if solved else 0.0
