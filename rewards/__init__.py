"""Rule-based rewards and the code sandbox (imported as r1pipe.rewards).

math: `extract_answer`, `math_equal`; rewards: `build_reward_fn(weights, **options)` ->
`RewardFn(completion, reference) -> RewardResult`; code: `r1pipe.rewards.code`,
`r1pipe.rewards.sandbox.run_python`; parallel scoring: `r1pipe.rewards.worker.RewardPool`.
"""

from .compose import (
    DOMAIN_REWARDS, GRADERS, REWARDS, RewardFn, RewardOptions, RewardResult, build_reward_fn, domain_of, graders_of,
    missing_reference, routed_rewards, solved,
)
from .extract import extract_answer, extract_gsm8k_gold, find_boxed, gold_answer, last_boxed
from .grader import Verdict, math_equal, verify_math

__all__ = [
    "DOMAIN_REWARDS", "GRADERS", "REWARDS", "RewardFn", "RewardOptions", "RewardResult", "build_reward_fn", "domain_of",
    "graders_of", "missing_reference", "routed_rewards", "solved",
    "extract_answer", "extract_gsm8k_gold", "find_boxed", "gold_answer", "last_boxed",
    "Verdict", "math_equal", "verify_math",
]
