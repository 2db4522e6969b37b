"""Named rule-based rewards combined with weights from config: `rewards: {accuracy: 1.0, format: 0.5}`.

Each reward maps (completion, reference, options) to (score, info). A reward that raises or times
out scores 0, is named in info["errors"], and the run goes on.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

from .cache import LRUCache
from .code import CodeResult, check_humaneval, check_mbpp, check_stdio, extract_code
from .extract import extract_answer, gold_answer
from .format import chain_of_thought, closing_summary, format_lenient, format_strict
from .grader import verify_math
from .language import language_share

log = logging.getLogger(__name__)


@dataclass
class RewardResult:
    total: float
    components: dict[str, float]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RewardOptions:
    extract_mode: str = "auto"  # see extract_answer
    fallback: str | None = None  # "last_number" / "last_math": when nothing is tagged, boxed, `####` or stated
    math_timeout_s: float = 5.0
    code_timeout_s: float = 10.0
    code_memory_mb: int = 1024
    code_cache: bool = True  # a program already run against the same tests is not run again (timeouts are)
    language: str = "en"
    think_in_prompt: bool = False  # the prompt ends with "<think>", so completions start inside it


Reward = Callable[[str, dict, RewardOptions], tuple[float, dict]]


def _gold_answer(reference: dict) -> str:
    if "answer" not in reference:
        raise KeyError("math reference needs an 'answer'")
    return gold_answer(str(reference["answer"]))


def accuracy_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    pred = extract_answer(completion, opt.extract_mode, opt.fallback)
    if pred is None:
        return 0.0, {"pred": None}
    v = verify_math(pred, _gold_answer(reference), opt.math_timeout_s)
    if v.timed_out:  # the verifier's deadline passed: a reward failure, counted in info["errors"]
        raise TimeoutError(f"math verification of {pred[:80]!r} exceeded {opt.math_timeout_s}s")
    info = {"pred": pred, "method": v.method}
    if v.error:
        info["error"] = v.error
    return float(v.equal), info


_code_cache: LRUCache[tuple[str, str, float, int], CodeResult] = LRUCache(50_000)
_TEST_CONTEXT = ("prompt", "test_imports")  # what the harnesses read beside the tests themselves


def run_tests(program: str, reference: dict, opt: RewardOptions) -> CodeResult:
    """`program` against the row's tests in the sandbox (HumanEval, MBPP or stdin/stdout style)."""
    if "entry_point" in reference and "test" in reference:
        return check_humaneval(reference, program, opt.code_timeout_s, opt.code_memory_mb)
    if "test_list" in reference:
        return check_mbpp(reference, program, opt.code_timeout_s, opt.code_memory_mb)
    if "inputs" in reference and "outputs" in reference:
        return check_stdio(program, list(reference["inputs"]), list(reference["outputs"]), opt.code_timeout_s,
                           opt.code_memory_mb)
    raise KeyError("code reference needs entry_point+test, test_list, or inputs+outputs")


def code_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    """The completion's program (`extract_code`: after `</think>`, inside `<answer>` tags when there are some),
    run against the row's tests; with `code_cache` a verdict already reached for the same program
    and tests is reused (samples of a confident policy repeat), a timeout is always run again. Its info
    holds the sandbox's status and the program it ran."""
    text = extract_code(completion)
    key = None
    if opt.code_cache:
        keys = [k for group in CODE_TEST_FIELDS for k in group] + list(_TEST_CONTEXT)
        tests = json.dumps({k: reference.get(k) for k in keys}, sort_keys=True, default=str)
        key = (text, tests, opt.code_timeout_s, opt.code_memory_mb)
    res = _code_cache.get(key) if key is not None else None
    if res is None:
        res = run_tests(text, reference, opt)
        if key is not None and not res.timed_out:
            _code_cache.put(key, res)
    info = {"status": res.status, "program": text}
    if res.timed_out:
        info["timeout"] = True
    if not res.passed and res.stderr:
        info["stderr_tail"] = res.stderr[-500:]
    return float(res.passed), info


def format_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    return format_strict(completion, opt.think_in_prompt), {}


def format_lenient_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    return format_lenient(completion, opt.think_in_prompt), {}


def summary_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    """1.0 iff the chain of thought closes with a summary (R1's readable pattern)."""
    return float(closing_summary(completion)), {}


def language_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    language = reference.get("language", opt.language)
    return language_share(chain_of_thought(completion), language), {"language": language}


REWARDS: dict[str, Reward] = {
    "accuracy": accuracy_reward,
    "code": code_reward,
    "format": format_reward,
    "format_lenient": format_lenient_reward,
    "language": language_reward,
    "summary": summary_reward,
}


class RewardFn:
    """`RewardFn(completion, reference) -> RewardResult`: the weighted sum of the named rewards.

    Plain data (weights + options), so it pickles into Ray workers.
    """

    def __init__(self, weights: dict[str, float], options: RewardOptions):
        self.weights = dict(weights)
        self.options = options

    def __call__(self, completion: str, reference: dict) -> RewardResult:
        components: dict[str, float] = {}
        info: dict = {"errors": {}, "timeouts": []}
        for name in routed_rewards(self.weights, reference):
            try:
                score, detail = REWARDS[name](completion, reference, self.options)
            except Exception as exc:  # a crashing reward scores 0 and is counted, never stops the run
                log.warning("reward %s failed: %s", name, exc)
                score, detail = 0.0, {}
                info["errors"][name] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, TimeoutError):
                    info["timeouts"].append(name)
                info.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=3)
            if detail.get("timeout"):
                info["timeouts"].append(name)
            if detail:
                info[name] = detail
            components[name] = float(score)
        total = sum(self.weights[n] * components[n] for n in components)
        return RewardResult(total, components, info)


def build_reward_fn(weights: dict[str, float], **options) -> RewardFn:
    """E.g. build_reward_fn({"accuracy": 1.0, "format": 0.5}, math_timeout_s=2.0)."""
    unknown = [n for n in weights if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    known = {f.name for f in fields(RewardOptions)}
    bad = [k for k in options if k not in known]
    if bad:
        raise ValueError(f"unknown reward option(s) {bad}; known: {sorted(known)}")
    for name, w in weights.items():
        if not isinstance(w, (int, float)):
            raise TypeError(f"weight of reward {name!r} must be a number, got {w!r}")
    return RewardFn({k: float(v) for k, v in weights.items()}, RewardOptions(**options))


# What each reward reads from a row's reference: rows that lack it are skipped before sampling.
CODE_TEST_FIELDS = (("entry_point", "test"), ("test_list",), ("inputs", "outputs"))


def has_tests(reference: dict) -> bool:
    return any(all(reference.get(k) is not None for k in group) for group in CODE_TEST_FIELDS)


def has_answer(reference: dict) -> bool:
    return bool(str(reference.get("answer") or "").strip())


def infer_domain(reference: dict) -> str | None:
    """A row without a `domain`: "code" when it has tests and no answer, "math" when it has an
    answer and no tests, else None (every reward applies)."""
    if has_tests(reference) != has_answer(reference):
        return "code" if has_tests(reference) else "math"
    return None


# Per-sample routing (all-scenario RL): the rewards that grade one domain's solutions; the others
# (format, format_lenient, language) read any response.
DOMAIN_REWARDS: dict[str, tuple[str, ...]] = {"math": ("accuracy",), "code": ("code",)}


def routed_rewards(names: Iterable[str], reference: dict) -> list[str]:
    """The rewards among `names` that apply to the row `reference`, in the given order.

    A row's `rewards` (a list of names) picks them explicitly; else its `domain` (or, without one,
    infer_domain's) keeps that domain's grader and drops every other domain's (a `domain` with no
    grader of its own, e.g. "chat", keeps only the domain-free rewards); else all of `names`.
    """
    names = list(names)
    wanted = reference.get("rewards")
    if wanted is not None:
        if isinstance(wanted, str) or not all(isinstance(w, str) for w in wanted):
            raise ValueError(f"a row's 'rewards' must be a list of reward names, got {wanted!r}")
        return [n for n in names if n in set(wanted)]
    domain = reference.get("domain") or infer_domain(reference)
    if domain is None:
        return names
    foreign = {r for d, rs in DOMAIN_REWARDS.items() if d != domain for r in rs}
    return [n for n in names if n not in foreign]


GRADERS: tuple[str, ...] = tuple(r for rs in DOMAIN_REWARDS.values() for r in rs)  # accuracy, code


def graders_of(names: Iterable[str], reference: dict) -> list[str]:
    """The grading rewards (accuracy / code) among `names` that apply to the row `reference`."""
    return [g for g in routed_rewards(names, reference) if g in GRADERS]


def domain_of(reference: dict) -> str:
    """The row's `domain`, else infer_domain's guess, else "other"."""
    return reference.get("domain") or infer_domain(reference) or "other"


def solved(components: dict[str, float], reference: dict, names: Iterable[str]) -> bool:
    """Graded correct: every grader that applies to the row scored > 0.5 (False when none applies)."""
    graders = graders_of(names, reference)
    return bool(graders) and all(components.get(g, 0.0) > 0.5 for g in graders)


def missing_reference(rewards: Iterable[str], reference: dict) -> str | None:
    """Why `reference` cannot be scored by the named rewards that apply to it (per-row routing,
    see routed_rewards), or None when it can."""
    rewards = list(rewards)
    try:
        names = set(routed_rewards(rewards, reference))
    except ValueError as e:
        return str(e)
    inferred = reference.get("domain") is None and reference.get("rewards") is None
    if inferred and set(rewards) & set(GRADERS) and not names & set(GRADERS):
        names = set(rewards)  # no grader of the run fits what the row carries: say what they need
    if "accuracy" in names and not has_answer(reference):
        return "no answer (the accuracy reward needs one)"
    if "code" in names and not has_tests(reference):
        return "no tests (the code reward needs entry_point+test, test_list or inputs+outputs)"
    return None
