"""Truncated importance sampling (TIS) for trainer/engine drift.

The rollout engine samples from pi_engine, which differs from the trainer's pi_old when the engine
runs in another precision or backend. The policy-gradient term of each token is re-weighted by

    w = min(pi_old / pi_engine, C) = min(exp(old_logp - engine_logp), C)

(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"); the cap C
bounds the variance. The weight is a constant (no gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor


def tis_weights(old_logp: Tensor, engine_logp: Tensor, cap: float = 2.0) -> tuple[Tensor, Tensor]:
    """(weights [B,T] = min(exp(old_logp - engine_logp), cap), bool mask [B,T] of tokens where the cap bit).

    Log-probs are [B,T] float; both outputs are detached.
    """
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    ratio = torch.exp((old_logp.detach() - engine_logp.detach()).float())
    return ratio.clamp(max=cap), ratio > cap
