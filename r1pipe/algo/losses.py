"""The GRPO-family policy loss: a policy-gradient surrogate, k3 KL to a reference, and loss aggregation.

Per token t of completion i with ratio r = exp(logp - old_logp) and advantage A_i, the surrogate
(`rl.algorithm.loss`) is one of:

    grpo:  pg = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)        (DAPO: clip_high > clip_low)
    gspo:  the same with the sequence's ratio s_i = exp(mean_t(logp - old_logp)) in place of r, as
           s_i,t = sg(s_i) * exp(logp - sg(logp)) (GSPO-token, Zheng et al. 2025): its value is s_i, so
           a whole sequence is clipped or not; its gradient is s_i * grad logp. With the aggregation
           "seq-mean-token-mean" this is GSPO's sequence objective exactly.
    cispo: pg = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp          (MiniMax-M1): the weight is
           clipped, never the gradient, so every token keeps one (PPO's clip zeroes clipped tokens).

and  kl = exp(ref - logp) - (ref - logp) - 1 (Schulman's k3, >= 0),  loss_token = pg + kl_coef * kl.

and the per-token losses are reduced over the batch by one of:

- "token-mean": sum over all tokens / number of tokens (DAPO): every token counts the same.
- "seq-mean-token-mean": mean over tokens within a sequence, then over sequences (GRPO paper).
- "seq-mean-token-sum-norm": sum over all tokens / (num sequences * a constant, the generation
  budget) (Dr. GRPO): no length bias from per-sequence normalisation.

Denominators can be given explicitly so that micro-batches on several data-parallel ranks sum
(after an all-reduce of gradients with SUM) to exactly the full-batch loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from r1pipe.vocab import LOSS_AGGREGATIONS, POLICY_LOSSES


def kl_k3(logp: Tensor, ref_logp: Tensor, max_log_ratio: float = 20.0) -> Tensor:
    """Unbiased, non-negative estimator of KL(pi || ref) per sampled token (k3).

    The log-ratio is clamped so a token the reference finds impossible cannot produce inf.
    """
    log_ratio = (ref_logp - logp).clamp(-max_log_ratio, max_log_ratio)
    return torch.exp(log_ratio) - log_ratio - 1.0


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per-token PPO/GRPO policy-gradient loss [B,T] and a bool mask of tokens where clipping is active.

    `advantages` is [B] (one per completion, broadcast over tokens) or [B,T].
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return torch.maximum(unclipped, clipped), clipped > unclipped


def gspo_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """GSPO-token loss [B,T] and the bool mask of tokens whose sequence ratio was clipped.

    `advantages` [B]; `mask` [B,T] picks the tokens whose log-ratios the sequence ratio averages.
    """
    on = (mask > 0).to(logp.dtype)
    seq_log_ratio = ((logp - old_logp) * on).sum(-1) / on.sum(-1).clamp(min=1.0)
    ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach())  # value s_i, gradient s_i * dlogp
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    return torch.maximum(unclipped, clipped), (clipped > unclipped).expand_as(logp)


def cispo_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """CISPO loss [B,T] (gradient -clip(r) * A * dlogp on every token) and the bool mask of tokens
    whose importance weight was clipped."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp.detach() - old_logp)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -weight * adv * logp, weight != ratio


def policy_surrogate(
    kind: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """The per-token policy-gradient loss [B,T] of surrogate `kind` (POLICY_LOSSES) and its clipped mask."""
    if kind == "grpo":
        return clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    if kind == "gspo":
        return gspo_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    if kind == "cispo":
        return cispo_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    raise ValueError(f"unknown policy loss {kind!r}; choose one of {POLICY_LOSSES}")


def aggregate(
    token_loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """Reduce per-token losses [B,T] under `mask` [B,T] (1 = a completion token, may carry weights).

    num_tokens / num_seqs default to this batch's; norm_constant (Dr. GRPO) defaults to T.
    """
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / max(float(denom), 1.0)
    seqs = float(token_loss.shape[0] if num_seqs is None else num_seqs)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        constant = float(token_loss.shape[1] if norm_constant is None else norm_constant)
        return masked.sum() / (max(seqs, 1.0) * constant)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_constant: float | None = None,
    tis_weight: Tensor | None = None,
    surrogate: str = "grpo",
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO-family loss (scalar, differentiable in logp) and token-summed statistics; `surrogate`
    picks the policy-gradient term (grpo | gspo | cispo, see the module docstring).

    `tis_weight` [B,T] (truncated importance sampling, r1pipe.algo.tis) multiplies the
    policy-gradient term of each token, not the KL term.

    The statistics are sums over masked tokens ("tokens" is the count) so that callers can add
    them across micro-batches and ranks before dividing: clipped (clip fraction), clipped_low /
    clipped_high (which side), kl, ratio, pg_loss.
    """
    token_pg, clipped = policy_surrogate(surrogate, logp, old_logp, advantages, mask, clip_low, clip_high)
    token_loss = token_pg if tis_weight is None else token_pg * tis_weight.detach()
    kl = None
    if kl_coef > 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        token_loss = token_loss + kl_coef * kl
    loss = aggregate(token_loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)

    with torch.no_grad():
        on = mask > 0
        ratio = torch.exp(logp - old_logp)
        adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
        stats = {
            "tokens": float(on.sum()),
            "clipped": float((clipped & on).sum()),
            "clipped_high": float((clipped & on & (adv > 0)).sum()),
            "clipped_low": float((clipped & on & (adv < 0)).sum()),
            "ratio": float((ratio * on).sum()),
            "pg_loss": float((token_pg * on).sum()),
            "kl": float((kl * on).sum()) if kl is not None else 0.0,
        }
    return loss, stats
