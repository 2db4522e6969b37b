"""The model runner: plans a batch over the paged latent cache and runs the model (main or MTP) on it.

It knows nothing about requests or sampling: a `Batch` is padded token rows with their positions and
block tables; the runner plans the cache for them and returns the model's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from r1pipe.engine.paged_cache import PagedLatentCache

_DRAFTER = 0  # MTP module used for every draft depth (one cache layer, reused recurrently)


@dataclass
class Batch:
    """Rows fed in one forward. ids/positions/valid [B, S] (padding: valid False, fed at position 0 and
    never stored); tables[b] is row b's block table."""

    ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    tables: list[list[int]]

    @staticmethod
    def prefill(rows: list[list[int]], tables: list[list[int]]) -> "Batch":
        """Token rows fed from position 0, right-padded to the longest."""
        lens = torch.tensor([len(r) for r in rows])
        S = int(lens.max())
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        valid = torch.arange(S).unsqueeze(0) < lens.unsqueeze(1)
        return Batch(ids, torch.arange(S).expand(len(rows), S) * valid, valid, tables)

    @staticmethod
    def decode(tokens: list[int], positions: list[int], tables: list[list[int]]) -> "Batch":
        """One token per row at the given positions."""
        B = len(tokens)
        return Batch(torch.tensor(tokens).view(B, 1), torch.tensor(positions).view(B, 1),
                     torch.ones(B, 1, dtype=torch.bool), tables)


class ModelRunner:
    """Runs a Transformer through a PagedLatentCache on one device."""

    def __init__(self, model: nn.Module, cache: PagedLatentCache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def forward(self, batch: Batch, routing: bool = False):
        """The main model on the batch (r1pipe.model ModelOutput: logits [B, S, V], hidden [B, S, D],
        routing per MoE layer [B, S, k] when asked)."""
        self.cache.plan(batch.tables, batch.positions, batch.valid)
        return self.model(batch.ids.to(self.device), positions=batch.positions.to(self.device), cache=self.cache,
                          return_routing=routing)

    def mtp(self, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafting MTP module on main-model hidden states [B, S, D] of the tokens at batch.positions and
        batch.ids, the tokens one position later -> (its hidden [B, S, D], logits [B, S, V])."""
        self.cache.plan(batch.tables, batch.positions, batch.valid)
        return self.model.mtp_step(_DRAFTER, hidden, batch.ids.to(self.device), batch.positions.to(self.device),
                                   cache=self.cache)
