"""Grading responses against a suite's references, in parallel.

Math: the answer is extracted (`<answer>` of the R1-Zero template, else the last `\\boxed{}`) and
compared with the gold by `r1pipe.rewards.verify_math` (math_equal with its verdict). Code: the program is taken from the last
```python block of the text after `</think>` and run in the sandbox against the suite's tests
(`r1pipe.rewards.code`). Each sample scores 1.0 or 0.0; a grader that raises scores 0 and the error
is kept with the sample. Work is spread over a thread pool: the heavy parts already run in child
processes (r1pipe.rewards' math-verify servers with hard deadlines, the code sandbox), so threads
overlap them without each worker paying for its own sympy import.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


from r1pipe.rewards import extract_answer, verify_math
from r1pipe.rewards.code import check_humaneval, check_mbpp, check_stdio
from r1pipe.tracking.progress import StepProgress

CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# Below this many samples a pool is not worth its threads.
MIN_POOL_JOBS = 8


@dataclass
class Graded:
    answer: str | None  # extracted answer (math) or program (code); None when nothing was found
    score: float
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def final_part(response: str) -> str:
    """The text after the chain of thought, when there is a closed one."""
    return response.rsplit("</think>", 1)[1] if "</think>" in response else response


def extract_code(response: str) -> str | None:
    """The last fenced code block after `</think>`, else that text itself; None when empty."""
    text = final_part(response)
    blocks = CODE_BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    return text if text.strip() else None  # unfenced: the sandbox decides whether it is a program


def grade_math(response: str, reference: dict, timeout_s: float, extract_mode: str) -> Graded:
    answer = extract_answer(response, mode=extract_mode)
    if answer is None or not answer.strip():
        return Graded(answer=None, score=0.0)
    verdict = verify_math(answer, str(reference["answer"]), timeout_s=timeout_s)
    error = "timeout" if verdict.timed_out else verdict.error
    return Graded(answer=answer, score=float(verdict.equal), error=error)


def grade_code(kind: str, response: str, reference: dict, timeout_s: float) -> Graded:
    code = extract_code(response)
    if code is None:
        return Graded(answer=None, score=0.0)
    if kind == "humaneval":
        result = check_humaneval(reference, code, timeout_s=timeout_s)
    elif kind == "mbpp":
        result = check_mbpp(reference, code, timeout_s=timeout_s)
    else:
        result = check_stdio(code, list(reference["inputs"]), list(reference["outputs"]), timeout_s=timeout_s)
    info = {"status": str(getattr(result, "status", "")), "timed_out": bool(getattr(result, "timed_out", False))}
    return Graded(answer=code, score=float(bool(result.passed)), info=info)


def grade_one(job: tuple[str, str, dict, float, str]) -> Graded:
    """One sample; never raises (a crashing grader scores 0 and says why)."""
    kind, response, reference, timeout_s, extract_mode = job
    try:
        if kind == "math":
            return grade_math(response, reference, timeout_s, extract_mode)
        return grade_code(kind, response, reference, timeout_s)
    except Exception as e:  # noqa: BLE001 -- the grader's failure is the sample's zero, not the run's end
        return Graded(answer=None, score=0.0, error=f"{type(e).__name__}: {e}")


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
    jobs = [(kind, r, ref, timeout_s, extract_mode) for r, ref in zip(responses, references)]
    results: list[Graded] = []
    with StepProgress(len(jobs), 0, description, unit="response", transient=True, enabled=progress) as bar:
        mapped = map(grade_one, jobs) if pool is None or len(jobs) < MIN_POOL_JOBS else pool.map(grade_one, jobs)
        for graded in mapped:
            results.append(graded)
            bar.advance()
    return results
