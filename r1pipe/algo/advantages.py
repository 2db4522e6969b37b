"""Group-relative advantages (DeepSeekMath's GRPO, outcome supervision).

Each prompt is sampled `group_size` times; a completion's advantage is its reward minus the
group mean, optionally divided by the group std. Dr. GRPO (Liu et al. 2025) drops the std
division because it up-weights groups that are nearly all right or all wrong.
"""
from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantages [N] for rewards [N] laid out as consecutive groups of `group_size`.

    std is the unbiased sample std, as in DeepSeekMath and TRL; a group whose rewards are all
    equal gets zero advantage either way (0 / (0 + eps) = 0).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)
