"""Grading responses against a suite's references, in parallel, through the rewards.

Every grade is the project's one grading path, `r1pipe.rewards` (what GRPO and rejection sampling
score with): math through the `accuracy` reward (`extract_answer`, then `verify_math`), code through
the `code` reward (`extract_code`, then the sandbox against the row's tests). Each sample scores 1.0
or 0.0; a grader that raises or times out scores 0 and the error is kept with the sample. Work is
spread over a thread pool: the heavy parts already run in child processes (math-verify servers with
hard deadlines, the code sandbox), so threads overlap them without each paying for a sympy import.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from r1pipe.rewards import RewardFn, build_reward_fn
from r1pipe.rewards.code import extract_code
from r1pipe.tracking.progress import StepProgress

# Below this many samples a pool is not worth its threads.
MIN_POOL_JOBS = 8


@dataclass
class Graded:
    answer: str | None  # extracted answer (math) or program (code); None when nothing was found
    score: float
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def grader(kind: str, timeout_s: float = 10.0, extract_mode: str = "auto") -> tuple[str, RewardFn]:
    """The reward that grades a suite of `kind` ("math" or a code kind) and its name."""
    name = "accuracy" if kind == "math" else "code"
    return name, build_reward_fn({name: 1.0}, extract_mode=extract_mode, math_timeout_s=timeout_s,
                                 code_timeout_s=timeout_s)


def grade_one(job: tuple[str, str, dict, RewardFn]) -> Graded:
    """One sample; never raises (a crashing grader scores 0 and says why)."""
    name, response, reference, reward = job
    try:
        result = reward(response, reference)
    except Exception as e:  # noqa: BLE001 -- the grader's failure is the sample's zero, not the run's end
        return Graded(answer=None, score=0.0, error=f"{type(e).__name__}: {e}")
    detail = result.info.get(name, {})
    error = "timeout" if name in result.info["timeouts"] else result.info["errors"].get(name)
    if name == "accuracy":
        return Graded(answer=detail.get("pred"), score=result.components.get(name, 0.0), error=error)
    program = extract_code(response)
    info = {"status": detail.get("status", "error"), "timed_out": bool(detail.get("timeout", False))}
    return Graded(answer=program if program.strip() else None, score=result.components.get(name, 0.0),
                  error=error, info=info)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def make_pool(num_workers: int | None = None) -> ThreadPoolExecutor | None:
    """A grading pool to share across suites; None for one worker."""
    workers = default_workers() if num_workers is None else num_workers
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grade") if workers > 1 else None


def grade_all(
    kind: str,
    responses: Sequence[str],
    references: Sequence[dict],
    *,
    timeout_s: float = 10.0,
    extract_mode: str = "auto",
    pool: ThreadPoolExecutor | None = None,
    description: str = "grading",
    progress: bool = True,
) -> list[Graded]:
    """Grade responses[i] against references[i], on `pool` when given; results in input order."""
    if len(responses) != len(references):
        raise ValueError("one reference per response")
    name, reward = grader(kind, timeout_s, extract_mode)
    jobs = [(name, r, ref, reward) for r, ref in zip(responses, references)]
    results: list[Graded] = []
    with StepProgress(len(jobs), 0, description, unit="response", transient=True, enabled=progress) as bar:
        mapped = map(grade_one, jobs) if pool is None or len(jobs) < MIN_POOL_JOBS else pool.map(grade_one, jobs)
        for graded in mapped:
            results.append(graded)
            bar.advance()
    return results
