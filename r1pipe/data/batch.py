"""What the trainer group is handed, and in which order: one collation and one epoch order for every stage.

A `TrainBatch` holds right-padded token rows and which tokens are trained. Row i is its tokens plus padding;
position t's logits predict token t+1, so the per-token tensors (log-probs, masks) are [B, S-1] and
`response_mask[i, t]` is 1 when token t+1 of row i is a training target: a completion token (GRPO), an
assistant token (SFT) or a corpus completion token (pretraining). Right padding keeps positions 0..len-1
for every row, exactly what the engine used, and causal attention never lets a real token see the padding
after it.

`EpochOrder` is the data position of every stage: epoch e is a permutation of the examples seeded by
(seed, e), so a step number (or a count of examples consumed) is all the state a resumed run needs to see
exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] bool, True on real tokens
    response_mask: Tensor  # [B, S-1] float: 1 where the target token is a training target
    routing: list[Tensor] | None = None  # per MoE layer [B, S, top_k] (routing replay) or None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_mask(self) -> Tensor:
        """[B, S] bool: token t is a training target (predicted from the tokens before it)."""
        first = torch.zeros_like(self.response_mask[:, :1], dtype=torch.bool)
        return torch.cat([first, self.response_mask > 0], dim=1)

    def num_targets(self, shift: int = 1) -> float:
        """Targets predicted `shift` tokens ahead (1: the next token; 2: an MTP module's), over every row."""
        return float(self.target_mask[:, shift:].sum())

    def rows(self, index: Tensor | slice) -> "TrainBatch":
        routing = None if self.routing is None else [r[index] for r in self.routing]
        return TrainBatch(self.input_ids[index], self.attention_mask[index], self.response_mask[index], routing)

    def trimmed(self, multiple: int = 1) -> "TrainBatch":
        """The same rows cut to their longest one, rounded up to a multiple of `multiple` (at most the
        current width): padding columns that every row has are dropped (right padding: the real tokens'
        positions and results do not change). A multiple > 1 keeps the set of shapes small for backends
        that compile a kernel per shape (oneDNN bf16 on CPU)."""
        S = self.input_ids.shape[1]
        longest = max(2, int(self.attention_mask.sum(1).max())) if len(self) else S
        width = min(S, -(-longest // multiple) * multiple)
        if width == S:
            return self
        routing = None if self.routing is None else [r[:, :width] for r in self.routing]
        return TrainBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.response_mask[:, : width - 1],
                          routing)


def by_length(batch: TrainBatch) -> Tensor:
    """Row indices, longest row first (ties in row order): cut into consecutive micro-batches, each
    holds rows of similar length and pads only to its own longest (TrainBatch.trimmed)."""
    return torch.argsort(batch.attention_mask.sum(1), descending=True, stable=True)


def collate(sequences: Sequence[Sequence[int]], target_masks: Sequence[Sequence[bool]], pad_id: int,
            routing: list[Tensor] | None = None) -> TrainBatch:
    """Right-padded rows of `sequences`; target_masks[i][t] says whether token t of row i is trained.
    `routing` (optional) is one LongTensor[num_moe_layers, len_i, top_k] per row (routing replay)."""
    if len(sequences) != len(target_masks):
        raise ValueError(f"{len(sequences)} sequences but {len(target_masks)} target masks")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if any(len(s) != len(m) for s, m in zip(sequences, target_masks)):
        raise ValueError("a target mask differs in length from its sequence")
    seq_len, batch = max(2, int(lengths.max())), len(sequences)
    attention_mask = torch.arange(seq_len) < lengths[:, None]
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    input_ids[attention_mask] = torch.tensor([t for s in sequences for t in s], dtype=torch.long)  # row-major
    targets = torch.zeros((batch, seq_len), dtype=torch.bool)
    targets[attention_mask] = torch.tensor([bool(x) for m in target_masks for x in m], dtype=torch.bool)
    replay = None
    if routing is not None:
        layers, _, top_k = routing[0].shape
        replay = [torch.zeros(batch, seq_len, top_k, dtype=torch.long) for _ in range(layers)]
        for i, r in enumerate(routing):
            for layer in range(layers):
                replay[layer][i, : r.shape[1]] = r[layer]
    return TrainBatch(input_ids, attention_mask, targets[:, 1:].float(), replay)


def build_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                routing: list[Tensor] | None = None) -> TrainBatch:
    """Prompt + completion rows whose targets are the completion tokens (rollouts, pretraining pairs)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    return collate([[*p, *c] for p, c in zip(prompt_ids, completion_ids)],
                   [[False] * len(p) + [True] * len(c) for p, c in zip(prompt_ids, completion_ids)], pad_id, routing)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s permutation of range(n), seeded by (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class EpochOrder:
    """Which examples optimizer step j takes: the next `batch_size` of its epoch's permutation (the last batch of
    an epoch may be short); ceil(n / batch_size) steps make an epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1 or batch_size < 1:
            raise ValueError(f"EpochOrder needs n >= 1 and batch_size >= 1, got {n} and {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._epoch, self._order = -1, list(range(n))

    def step(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n, self.seed, epoch)
        return self._order[j * self.batch_size:(j + 1) * self.batch_size]
