"""Grading a suite's responses as the stages grade theirs: on a RewardPool (r1pipe.rewards.worker, what GRPO
and rejection sampling score with), by the rewards' graders routed per row (r1pipe.rewards.routed_rewards):
math through the `accuracy` reward (`extract_answer`, then `verify_math`), code through the `code` reward
(`extract_code`, then the sandbox against the row's tests). Each reference carries its suite's domain, so the
row's grader is the suite's; a sample scores 1.0 when `solved` says so (as rejection sampling's judge and the
scorecard decide), else 0.0. What eval records beside the score (the extracted answer or program, the
sandbox's status, a grader's error or timeout) comes from the reward's own result info.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from r1pipe.rewards import GRADERS, RewardResult, solved
from r1pipe.rewards.worker import RewardPool
from r1pipe.tracking.progress import StepProgress

GRADER_WEIGHTS = {name: 1.0 for name in GRADERS}  # accuracy and code; each row keeps its domain's
CHUNK = 256  # responses per pool call (the progress bar advances by these)


@dataclass
class Graded:
    answer: str | None  # extracted answer (math) or program (code); None when nothing was found
    score: float
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def domain(kind: str) -> str:
    """The rewards' domain of a suite kind: "math", else "code"."""
    return "math" if kind == "math" else "code"


def grading_pool(timeout_s: float = 10.0, extract_mode: str = "auto", threads: int | None = None,
                 cpus: float = 0.5) -> RewardPool:
    """One reward actor of `cpus` Ray CPUs scoring on `threads` threads (None: the pool's default) with
    every check limited to `timeout_s`. Ray must be initialised."""
    return RewardPool(GRADER_WEIGHTS, num_workers=1, num_cpus_per_worker=cpus, threads_per_worker=threads,
                      extract_mode=extract_mode, math_timeout_s=timeout_s, code_timeout_s=timeout_s)


def graded(kind: str, result: RewardResult, reference: dict) -> Graded:
    """Eval's record of one reward result for a response to a `kind` problem."""
    name = "accuracy" if kind == "math" else "code"
    detail = result.info.get(name, {})
    error = "timeout" if name in result.info["timeouts"] else result.info["errors"].get(name)
    score = float(solved(result.components, reference, list(GRADER_WEIGHTS)))
    if name == "accuracy":
        return Graded(answer=detail.get("pred"), score=score, error=error)
    program = detail.get("program") or ""
    info = {"status": detail.get("status", "error"), "timed_out": bool(detail.get("timeout", False))}
    return Graded(answer=program if program.strip() else None, score=score, error=error, info=info)


def grade_all(kind: str, responses: Sequence[str], references: Sequence[dict], pool: Any, *,
              description: str = "grading", progress: bool = True) -> list[Graded]:
    """Grade responses[i] against references[i] (a `kind` suite's) on `pool` (a RewardPool, or anything
    with its `score`, e.g. the RewardWorker it runs); results in input order."""
    if len(responses) != len(references):
        raise ValueError("one reference per response")
    routed = [{**ref, "domain": domain(kind)} for ref in references]
    results: list[Graded] = []
    with StepProgress(len(routed), 0, description, unit="response", transient=True, enabled=progress) as bar:
        for start in range(0, len(routed), CHUNK):
            refs = routed[start:start + CHUNK]
            scored = pool.score(list(responses[start:start + CHUNK]), refs)
            results.extend(graded(kind, r, ref) for r, ref in zip(scored, refs))
            bar.advance(n=len(refs))
    return results
