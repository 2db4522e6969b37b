"""Training loss: next-token cross-entropy plus lambda * the mean MTP cross-entropy (plus the balance loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DEFAULT_MTP_LAMBDA
from .transformer import ModelOutput


def shifted_ce(logits: Tensor, input_ids: Tensor, shift: int, loss_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean CE of logits at t against token t+shift over the targets loss_mask marks; also (#correct, #targets)."""
    S = input_ids.shape[1]
    pred = logits[:, : S - shift]
    target = input_ids[:, shift:]
    mask = torch.ones_like(target, dtype=torch.bool) if loss_mask is None else loss_mask[:, shift:].bool()
    ce = F.cross_entropy(pred.flatten(0, 1).float(), target.flatten(), reduction="none").view_as(target)
    count = mask.sum()
    loss = (ce * mask).sum() / count.clamp(min=1)
    correct = ((pred.argmax(-1) == target) & mask).sum()
    return loss, correct, count


def lm_loss(output: ModelOutput, input_ids: Tensor, loss_mask: Tensor | None = None,
            mtp_lambda: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """loss_mask [B,S] marks tokens that count as targets (e.g. completion tokens, not the prompt or padding)."""
    lam = DEFAULT_MTP_LAMBDA if mtp_lambda is None else mtp_lambda
    main, correct, count = shifted_ce(output.logits, input_ids, 1, loss_mask)
    metrics = {"main_loss": main.item(), "accuracy": (correct / count.clamp(min=1)).item(), "tokens": count.item()}
    loss = main
    if output.mtp_logits:
        mtp_losses = []
        for k, logits in enumerate(output.mtp_logits):
            mtp_loss, mtp_correct, mtp_count = shifted_ce(logits, input_ids, k + 2, loss_mask)
            mtp_losses.append(mtp_loss)
            metrics[f"mtp{k}_loss"] = mtp_loss.item()
            metrics[f"mtp{k}_accuracy"] = (mtp_correct / mtp_count.clamp(min=1)).item()
        mtp_mean = torch.stack(mtp_losses).mean()
        metrics["mtp_loss"] = mtp_mean.item()
        loss = loss + lam * mtp_mean
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
        metrics["aux_loss"] = float(output.aux_loss)
    metrics["loss"] = loss.item()
    return loss, metrics
