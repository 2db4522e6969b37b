"""GRPO as pure functions on tensors: advantages, losses, KL, sampling filters, metrics.

Nothing here knows about Ray, models or engines, so every piece is testable by hand.
"""
from r1pipe.algo.advantages import (
    batch_normalized_advantages,
    compute_advantages,
    group_advantages,
    rloo_advantages,
)
from r1pipe.algo.draft import draft_loss
from r1pipe.algo.logprobs import tempered_log_softmax, token_logprobs, token_logprobs_and_entropy
from r1pipe.algo.losses import (
    LOSS_AGGREGATIONS,
    aggregate,
    cispo_surrogate,
    clipped_surrogate,
    grpo_loss,
    gspo_surrogate,
    kl_k3,
    policy_surrogate,
)
from r1pipe.algo.sampling import (
    dynamic_sampling_keep,
    overlong_filter_mask,
    overlong_soft_penalty,
)
from r1pipe.algo.tis import tis_weights

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate",
    "batch_normalized_advantages",
    "cispo_surrogate",
    "clipped_surrogate",
    "compute_advantages",
    "draft_loss",
    "dynamic_sampling_keep",
    "group_advantages",
    "grpo_loss",
    "gspo_surrogate",
    "kl_k3",
    "overlong_filter_mask",
    "overlong_soft_penalty",
    "policy_surrogate",
    "rloo_advantages",
    "tempered_log_softmax",
    "tis_weights",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
