"""Supervised fine-tuning losses as pure functions: masked next-token cross-entropy summed over
target tokens, so a step's loss can be normalised by the step's whole target count however the
step is split into micro-batches (gradient accumulation gives exactly the full-batch gradient).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_ce_sum(logits: Tensor, input_ids: Tensor, target_mask: Tensor, shift: int = 1) -> tuple[Tensor, Tensor]:
    """(sum of CE over targets, number of targets) for predicting token t + shift from position t.

    logits [B,S,V]; input_ids [B,S]; target_mask [B,S] bool, True where the token is a training
    target (assistant text; not the prompt, not padding). Position t's logits predict
    input_ids[t + shift] and count iff target_mask[t + shift].
    """
    S = input_ids.shape[1]
    if S <= shift:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    pred = logits[:, : S - shift].float()
    target = input_ids[:, shift:]
    mask = target_mask[:, shift:].bool()
    ce = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    return (ce * mask).sum(), mask.sum()


def per_sample_ce(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Mean next-token CE over each row's targets: [B] (rows without targets give 0)."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = target_mask[:, 1:].float()
    ce = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    return (ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)
