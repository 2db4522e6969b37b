"""Advantages from outcome rewards: one scalar per completion, laid out as consecutive groups of
`group_size` samples of one prompt.

- "grpo" (DeepSeekMath): reward minus the group mean, divided by the group std.
- "dr-grpo" (Liu et al. 2025, Dr. GRPO): reward minus the group mean; no std division, which
  up-weights groups that are nearly all right or all wrong.
- "rloo" (Ahmadian et al. 2024): reward minus the mean of the *other* samples of the group,
  = G/(G-1) x (reward - group mean): an unbiased leave-one-out baseline.
- "reinforce++" (Hu 2025): the reward normalised over the global batch, (r - batch mean) / batch
  std, so every prompt's samples share one scale and no per-group statistics are needed.

In the group-relative estimators a group whose rewards are all equal gets exactly zero advantage
(its float mean can miss the common value by an ulp; that residue over (0 + eps) would be a spurious
advantage: eight rewards of 0.1 would each get -0.0074). std is the unbiased sample std, as in
DeepSeekMath and TRL.
"""
from __future__ import annotations

import torch
from torch import Tensor

from r1pipe.algo.sampling import dynamic_sampling_keep
from r1pipe.vocab import ADVANTAGE_ESTIMATORS


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)


def _zero_equal_groups(advantages: Tensor, rewards: Tensor, group_size: int) -> Tensor:
    informative = dynamic_sampling_keep(rewards, group_size).unsqueeze(1)
    return torch.where(informative, advantages.view(-1, group_size), 0.0).reshape(-1)


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages [N] for rewards [N] (Dr. GRPO's with normalize_std=False)."""
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return _zero_equal_groups(centred, rewards, group_size)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out advantages [N]: r_i - mean_{j != i} r_j within each group."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (a baseline from the other samples)")
    grouped = _grouped(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return _zero_equal_groups(grouped - others, rewards, group_size)


def batch_normalized_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ advantages [N]: (r - mean) / (std + eps) over the whole batch; 0 when all are equal."""
    r = rewards.float()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got {tuple(r.shape)}")
    if r.numel() < 2 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


def compute_advantages(estimator: str, rewards: Tensor, group_size: int) -> Tensor:
    """Advantages [N] for rewards [N] by `estimator` (`rl.algorithm.advantage`): one of ADVANTAGE_ESTIMATORS."""
    if estimator == "grpo":
        return group_advantages(rewards, group_size)
    if estimator == "dr-grpo":
        return group_advantages(rewards, group_size, normalize_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size)
    if estimator == "reinforce++":
        return batch_normalized_advantages(rewards)
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")
