"""Group-relative advantages (DeepSeekMath's GRPO, outcome supervision).

Each prompt is sampled `group_size` times; a completion's advantage is its reward minus the
group mean, optionally divided by the group std. Dr. GRPO (Liu et al. 2025) drops the std
division because it up-weights groups that are nearly all right or all wrong.
"""
from __future__ import annotations

import torch
from torch import Tensor

from r1pipe.algo.sampling import dynamic_sampling_keep


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantages [N] for rewards [N] laid out as consecutive groups of `group_size`.

    std is the unbiased sample std, as in DeepSeekMath and TRL. A group whose rewards are all
    equal (dynamic sampling's test) gets exactly zero advantage: its float mean can miss the
    common value by an ulp, and that residue divided by (0 + eps) would be a spurious advantage
    (eight rewards of 0.1 would each get -0.0074).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    informative = dynamic_sampling_keep(rewards, group_size).unsqueeze(1)
    return torch.where(informative, centred, 0.0).reshape(-1)
