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


def forward_kl_sum(student_logits: Tensor, teacher_logits: Tensor, target_mask: Tensor,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sum over target positions of KL(teacher || student), number of targets): logit distillation.

    Position t's distributions predict token t + 1, which counts iff target_mask[t + 1] (as in
    masked_ce_sum). Both distributions are softened by `temperature`; the sum is scaled by T^2 so
    gradients keep their size across temperatures (Hinton et al.). student_logits, teacher_logits
    [B,S,V] over the same vocabulary.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation needs one tokenizer")
    mask = target_mask[:, 1:].bool()
    log_s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() * temperature**2, mask.sum()
