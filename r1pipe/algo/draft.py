"""The decoupled draft loss that keeps an MTP drafter fresh during RL.

Speculative decoding accepts a draft token with probability min(1, p / q), so what matters is how
close the drafter's distribution q is to the policy's p. As the policy moves, a frozen drafter falls
behind. The draft loss distils the policy's own (detached, tempered) next-token distribution into the
drafter at the rollout positions: KL(p || q) summed over masked positions, divided by their count.
Its gradient reaches only the drafter's logits.
"""
from __future__ import annotations

from torch import Tensor

from r1pipe.algo.logprobs import tempered_log_softmax


def draft_loss(draft_logits: Tensor, target_logits: Tensor, mask: Tensor, temperature: float = 1.0,
               num_positions: float | None = None) -> Tensor:
    """Mean over masked positions of KL(softmax(target / T) || softmax(draft / T)).

    draft_logits, target_logits [B,T,V] (the target is detached here); mask [B,T] (1 = a position to
    train); num_positions defaults to mask.sum() (give a global count to sum micro-batches exactly).
    """
    target = tempered_log_softmax(target_logits.detach(), temperature)
    draft = tempered_log_softmax(draft_logits, temperature)
    kl = (target.exp() * (target - draft)).sum(-1)
    denom = float(mask.sum()) if num_positions is None else num_positions
    return (kl * mask.to(kl.dtype)).sum() / max(denom, 1.0)
