"""Filters applied to a batch of rollouts before the update (DAPO).

- Dynamic sampling: a group whose rewards are all equal has zero advantage everywhere and
  only dilutes the batch; drop it (and sample more prompts if the batch falls short).
- Overlong handling: a completion cut at the token budget is not necessarily wrong; either
  mask it out of the loss (filtering) or add a length penalty that ramps up over the last
  `cache_len` tokens of the budget (soft overlong punishment).
"""
from __future__ import annotations

import torch
from torch import Tensor


def dynamic_sampling_keep(rewards: Tensor, group_size: int, atol: float = 1e-6) -> Tensor:
    """BoolTensor [num_groups]: True for groups whose rewards are not all equal."""
    grouped = rewards.float().view(-1, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread > atol


def overlong_filter_mask(truncated: Tensor) -> Tensor:
    """Per-sequence loss weight [N]: 0 for completions cut at the length budget, 1 otherwise."""
    return (~truncated.bool()).float()


def overlong_soft_penalty(lengths: Tensor, max_len: int, cache_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward [N].

    0 up to max_len - cache_len tokens, then a linear ramp to -penalty at max_len, and -penalty
    beyond it.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.float()
    free = max_len - cache_len
    ramp = (free - lengths) / cache_len * penalty
    out = torch.where(lengths <= free, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -penalty), out)
