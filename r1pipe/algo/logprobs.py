"""Per-token log-probs and entropy of sampled tokens, with the sampling temperature.

The rollout engine reports log_softmax(logits / T) of each sampled token; the trainer must use
the same T or the importance ratio is off from the first step.
"""
from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits [B,T,V] predicting tokens [B,T] -> (log-prob of each token [B,T], entropy [B,T]).

    Computed in float32; entropy is of the tempered distribution, the one that was sampled.
    """
    scaled = logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    token_logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy
