"""The one next-token cross-entropy (and the MTP modules' loss built from it), summed over target tokens.

Sums, not means: a step's loss is normalised by the step's whole target count, so however a step is split
into micro-batches (or over data-parallel workers) the gradient is the full batch's. `lm_loss` is the mean
form for a single batch (the model's own training tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DEFAULT_MTP_LAMBDA
from .transformer import ModelOutput


def masked_ce_sum(logits: Tensor, input_ids: Tensor, target_mask: Tensor | None = None, shift: int = 1) -> tuple[Tensor, Tensor]:
    """(sum of CE over targets, number of targets) for predicting token t + shift from position t.

    logits [B,S,V]; input_ids [B,S]; target_mask [B,S] bool, True where the token is a training target
    (assistant or completion text; not the prompt, not padding); None: every token. Position t's logits
    predict input_ids[t + shift] and count iff target_mask[t + shift].
    """
    S = input_ids.shape[1]
    if S <= shift:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    pred = logits[:, : S - shift].float()
    target = input_ids[:, shift:]
    mask = torch.ones_like(target, dtype=torch.bool) if target_mask is None else target_mask[:, shift:].bool()
    ce = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    return (ce * mask).sum(), mask.sum()


def _accuracy(logits: Tensor, input_ids: Tensor, target_mask: Tensor | None, shift: int) -> float:
    S = input_ids.shape[1]
    target = input_ids[:, shift:]
    mask = torch.ones_like(target, dtype=torch.bool) if target_mask is None else target_mask[:, shift:].bool()
    correct = ((logits[:, : S - shift].argmax(-1) == target) & mask).sum()
    return float(correct / mask.sum().clamp(min=1))


def lm_loss(output: ModelOutput, input_ids: Tensor, loss_mask: Tensor | None = None,
            mtp_lambda: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Mean next-token CE + lambda * the mean over MTP modules of their mean CE (+ the balance loss) on one
    batch; loss_mask [B,S] marks the target tokens (None: all)."""
    lam = DEFAULT_MTP_LAMBDA if mtp_lambda is None else mtp_lambda
    total, count = masked_ce_sum(output.logits, input_ids, loss_mask)
    loss = total / count.clamp(min=1)
    metrics = {"main_loss": loss.item(), "accuracy": _accuracy(output.logits, input_ids, loss_mask, 1), "tokens": count.item()}
    if output.mtp_logits:
        mtp_losses = []
        for k, logits in enumerate(output.mtp_logits):
            mtp_total, mtp_count = masked_ce_sum(logits, input_ids, loss_mask, shift=k + 2)
            mtp_losses.append(mtp_total / mtp_count.clamp(min=1))
            metrics[f"mtp{k}_loss"] = mtp_losses[-1].item()
            metrics[f"mtp{k}_accuracy"] = _accuracy(logits, input_ids, loss_mask, k + 2)
        mtp_mean = torch.stack(mtp_losses).mean()
        metrics["mtp_loss"] = mtp_mean.item()
        loss = loss + lam * mtp_mean
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
        metrics["aux_loss"] = float(output.aux_loss)
    metrics["loss"] = loss.item()
    return loss, metrics
