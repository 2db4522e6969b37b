"""Per-token log-probs and entropy of sampled tokens, with the sampling temperature.

The one tempered log-prob function of the project: the rollout engine's sampler and the trainer
both call `token_logprobs`, so log_softmax(logits / T) of a sampled token is computed the same
way on both sides (float32, temperature as a float or a per-row tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor


def tempered_logits(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """logits / T in float32. logits [..., V]; T a float or a tensor broadcastable to [..., 1] (a float 1.0
    divides nothing: x / 1.0 == x exactly, and the division would cost a pass and its backward)."""
    scaled = logits.float()
    if isinstance(temperature, (int, float)) and temperature == 1:
        return scaled
    return scaled / temperature


def tempered_log_softmax(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log_softmax(logits / T) in float32 (see tempered_logits)."""
    return torch.log_softmax(tempered_logits(logits, temperature), dim=-1)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """logits [..., V] predicting tokens [...] -> log-prob of each token [...] at temperature T."""
    return tempered_log_softmax(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits [B,T,V] predicting tokens [B,T] -> (log-prob of each token [B,T], entropy [B,T]).

    Entropy is of the tempered distribution, the one that was sampled; it is a statistic, computed without a
    gradient (no loss here differentiates it, and the graph would keep its [B,T,V] terms alive).
    """
    log_probs = tempered_log_softmax(logits, temperature)
    token_logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy
