"""Named rule-based rewards combined with weights from config: `rewards: {accuracy: 1.0, format: 0.5}`.

Each reward maps (completion, reference, options) to (score, info). A reward that raises or times
out scores 0, is named in info["errors"], and the run goes on.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

from .code import check_humaneval, check_mbpp, check_stdio
from .extract import extract_answer, extract_gsm8k_gold
from .format import chain_of_thought, format_lenient, format_strict
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
    language: str = "en"
    think_in_prompt: bool = False  # the prompt ends with "<think>", so completions start inside it


Reward = Callable[[str, dict, RewardOptions], tuple[float, dict]]


def _gold_answer(reference: dict) -> str:
    if "answer" not in reference:
        raise KeyError("math reference needs an 'answer'")
    gold = str(reference["answer"])
    if "####" in gold:  # a raw GSM8K answer field
        gold = extract_gsm8k_gold(gold) or gold
    return gold


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


def code_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    text = completion.split("</think>", 1)[1] if "</think>" in completion else completion
    if "entry_point" in reference and "test" in reference:
        res = check_humaneval(reference, text, opt.code_timeout_s, opt.code_memory_mb)
    elif "test_list" in reference:
        res = check_mbpp(reference, text, opt.code_timeout_s, opt.code_memory_mb)
    elif "inputs" in reference and "outputs" in reference:
        res = check_stdio(text, list(reference["inputs"]), list(reference["outputs"]), opt.code_timeout_s,
                          opt.code_memory_mb)
    else:
        raise KeyError("code reference needs entry_point+test, test_list, or inputs+outputs")
    info = {"status": res.status}
    if res.timed_out:
        info["timeout"] = True
    if not res.passed and res.stderr:
        info["stderr_tail"] = res.stderr[-500:]
    return float(res.passed), info


def format_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    return format_strict(completion, opt.think_in_prompt), {}


def format_lenient_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    return format_lenient(completion, opt.think_in_prompt), {}


def language_reward(completion: str, reference: dict, opt: RewardOptions) -> tuple[float, dict]:
    language = reference.get("language", opt.language)
    return language_share(chain_of_thought(completion), language), {"language": language}


REWARDS: dict[str, Reward] = {
    "accuracy": accuracy_reward,
    "code": code_reward,
    "format": format_reward,
    "format_lenient": format_lenient_reward,
    "language": language_reward,
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
        for name, weight in self.weights.items():
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


def missing_reference(rewards: Iterable[str], reference: dict) -> str | None:
    """Why `reference` cannot be scored by the named rewards, or None when it can."""
    names = set(rewards)
    if "accuracy" in names and not str(reference.get("answer") or "").strip():
        return "no answer (the accuracy reward needs one)"
    if "code" in names and not any(all(reference.get(k) is not None for k in group) for group in CODE_TEST_FIELDS):
        return "no tests (the code reward needs entry_point+test, test_list or inputs+outputs)"
    return None
