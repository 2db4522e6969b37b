"""Per-token log-probs and entropy of sampled tokens, with the sampling temperature.

The one tempered log-prob function of the project: the rollout engine's sampler and the trainer
both call `token_logprobs`, so log_softmax(logits / T) of a sampled token is computed the same
way on both sides (float32, temperature as a float or a per-row tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor


def tempered_log_softmax(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log_softmax(logits / T) in float32. logits [..., V]; T a float or a tensor broadcastable to [..., 1]."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """logits [..., V] predicting tokens [...] -> log-prob of each token [...] at temperature T."""
    return tempered_log_softmax(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits [B,T,V] predicting tokens [B,T] -> (log-prob of each token [B,T], entropy [B,T]).

    Entropy is of the tempered distribution, the one that was sampled.
    """
    log_probs = tempered_log_softmax(logits, temperature)
    token_logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy
