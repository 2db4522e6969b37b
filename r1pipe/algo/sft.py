"""Supervised losses as pure functions: next-token cross-entropy (+ the MTP modules' CE) on target tokens
and forward KL to a teacher's logits, each summed over targets and divided by the *whole step's* target
counts, so any split of a step into micro-batches or data-parallel workers gives the full batch's gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from r1pipe.model.loss import masked_ce_sum


@dataclass(frozen=True)
class SupervisedLoss:
    """Which terms a supervised step trains (pretraining and `sft.loss: ce | kl | ce+kl`)."""

    ce_weight: float = 1.0  # next-token CE on the targets
    kl_weight: float = 0.0  # forward KL(teacher || student) on the targets (logit distillation)
    kl_temperature: float = 1.0
    mtp: bool = True  # r1pipe V3 with MTP modules: + mtp_lambda * mean over modules of their CE


@dataclass(frozen=True)
class TargetCounts:
    """The whole step's normalisers: targets predicted 1 token ahead, then k + 2 ahead for MTP module k."""

    ahead: tuple[float, ...]

    @classmethod
    def of(cls, target_mask: Tensor, depth: int) -> "TargetCounts":
        """target_mask [B,S] bool of the whole step; depth = MTP modules trained (0: none)."""
        return cls(tuple(float(target_mask[:, shift:].sum()) for shift in range(1, 2 + depth)))


def supervised_loss(logits: Tensor, mtp_logits: list[Tensor], input_ids: Tensor, target_mask: Tensor, counts: TargetCounts,
                    spec: SupervisedLoss, mtp_lambda: float = 0.0, teacher_logits: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the step loss: ce_weight * CE / N1 + kl_weight * KL / N1 +
    mtp_lambda / D * sum_k CE_k / N_{k+2}; logits [B,S,V], mtp_logits D x [B,S,V], input_ids [B,S],
    target_mask [B,S] bool. Returns (loss, {"ce", "kl", "mtp"}: each term's share, unweighted)."""
    ce, _ = masked_ce_sum(logits, input_ids, target_mask)
    ce = ce / max(counts.ahead[0], 1.0)
    loss = spec.ce_weight * ce
    stats = {"ce": float(ce.detach())}
    if spec.kl_weight:
        if teacher_logits is None:
            raise ValueError("kl_weight > 0 needs the teacher's logits")
        kl, _ = forward_kl_sum(logits, teacher_logits, target_mask, spec.kl_temperature)
        kl = kl / max(counts.ahead[0], 1.0)
        loss = loss + spec.kl_weight * kl
        stats["kl"] = float(kl.detach())
    if mtp_logits:
        mtp = sum(masked_ce_sum(extra, input_ids, target_mask, shift=k + 2)[0] / max(counts.ahead[k + 1], 1.0)
                  for k, extra in enumerate(mtp_logits)) / len(mtp_logits)
        loss = loss + mtp_lambda * mtp
        stats["mtp"] = float(mtp.detach())
    return loss, stats


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


__all__ = ["SupervisedLoss", "TargetCounts", "forward_kl_sum", "masked_ce_sum", "supervised_loss"]
