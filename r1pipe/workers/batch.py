"""The rollout batch as the trainer sees it: right-padded prompt+completion rows and masks.

Row i is prompt_i + completion_i + padding. Position t's logits predict token t+1, so the
per-token tensors (log-probs, masks) are [B, S-1] and `response_mask[i, t]` is 1 when token t+1
of row i is a completion token. Right padding keeps positions 0..len-1 for every row, exactly
what the engine used, and causal attention never lets a real token see the padding after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] bool, True on real tokens
    response_mask: Tensor  # [B, S-1] float: 1 where the target token is a completion token
    routing: list[Tensor] | None = None  # per MoE layer [B, S, top_k] (routing replay) or None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor | slice) -> "TrainBatch":
        routing = None if self.routing is None else [r[index] for r in self.routing]
        return TrainBatch(self.input_ids[index], self.attention_mask[index], self.response_mask[index], routing)


def build_batch(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    routing: list[Tensor] | None = None,
) -> TrainBatch:
    """Pack rows; `routing` (optional) is one LongTensor[num_moe_layers, P_i + C_i, top_k] per row."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    seq_len = max(lengths)
    batch = len(lengths)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    response_mask = torch.zeros(batch, seq_len - 1)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : lengths[i]] = True
        response_mask[i, len(p) - 1 : lengths[i] - 1] = 1.0
    replay = None
    if routing is not None:
        layers, _, top_k = routing[0].shape
        replay = [torch.zeros(batch, seq_len, top_k, dtype=torch.long) for _ in range(layers)]
        for i, r in enumerate(routing):
            for layer in range(layers):
                replay[layer][i, : r.shape[1]] = r[layer]
    return TrainBatch(input_ids, attention_mask, response_mask, replay)


def pad_per_token(values: list[list[float]], prompt_lens: list[int], shape: tuple[int, int]) -> Tensor:
    """Engine per-completion-token values (e.g. log-probs) placed on the [B, S-1] target grid."""
    out = torch.zeros(shape)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        out[i, p - 1 : p - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out
