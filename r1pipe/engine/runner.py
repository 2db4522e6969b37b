"""The model runner: plans a batch over the paged cache and runs the model (main or MTP) on it.

It knows nothing about requests or sampling: a `Batch` is padded token rows with their positions and
block tables; the runner plans the cache for them and returns the model's outputs.

Decode steps (one token per row) go through `decode`: eagerly, or, with CUDA graphs, padded to a batch-size
bucket with a fixed block-table width (static shapes) and replayed from the graph captured for that bucket
(r1pipe.engine.cuda_graphs). `decode_forward` is the step as it is captured: no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1pipe.engine.adapter import EngineModel
from r1pipe.engine.cuda_graphs import DecodeGraphs
from r1pipe.engine.paged_cache import SCRATCH_BLOCK, PagedCache

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

    def padded(self, rows: int) -> "Batch":
        """The batch with padding rows appended up to `rows` (token 0 at position 0, not valid, no blocks)."""
        extra = rows - self.ids.shape[0]
        if extra <= 0:
            return self
        pad = lambda t: torch.cat([t, t.new_zeros(extra, t.shape[1])])  # noqa: E731
        return Batch(pad(self.ids), pad(self.positions), pad(self.valid), self.tables + [[SCRATCH_BLOCK]] * extra)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes a static-shape decode step is padded to: 1, 2, 4, 8, 16, then every multiple of 32,
    and max_num_seqs itself (the largest)."""
    sizes = {b for b in (1, 2, 4, 8, 16) if b < max_num_seqs} | set(range(32, max_num_seqs, 32)) | {max_num_seqs}
    return sorted(sizes)


class ModelRunner:
    """Runs an EngineModel through a PagedCache on one device. max_model_len and max_num_seqs fix the
    static decode shapes (table width, buckets); cuda_graphs replays decode steps from CUDA graphs."""

    def __init__(self, model: EngineModel, cache: PagedCache, device: torch.device, max_model_len: int = 4096,
                 max_num_seqs: int = 256, cuda_graphs: bool = False) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.table_width = -(-max_model_len // cache.block_size)  # blocks a row can need
        self.buckets = decode_buckets(max_num_seqs)
        self.graphs = DecodeGraphs(self) if cuda_graphs else None

    def bucket(self, rows: int) -> int:
        """The smallest decode bucket holding `rows` rows."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"a decode step of {rows} rows exceeds max_num_seqs {self.buckets[-1]}")

    def plan_static(self, batch: Batch) -> Batch:
        """Pad a decode batch to its bucket and plan the cache with the fixed table width: the static shapes of
        a captured step. Returns the padded batch."""
        padded = batch.padded(self.bucket(batch.ids.shape[0]))
        self.cache.plan(padded.tables, padded.positions, padded.valid, width=self.table_width)
        return padded

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of the main model on the planned cache, as a CUDA graph captures it (no host
        synchronisation; fullgraph-compilable): ids/positions [B, 1] on the device -> (logits [B, V], expert ids
        [MoE layers, B, k], 0 layers for a model without MoE)."""
        out = self.model.forward(ids, positions, self.cache, return_routing=True)
        k = self.model.facts.num_experts_per_tok
        routing = torch.stack(out.routing)[:, :, 0] if out.routing else ids.new_zeros(0, ids.shape[0], k)
        return out.logits[:, -1], routing

    def decode(self, batch: Batch, routing: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per row -> (logits [B, V], expert ids [MoE layers, B, k] when asked). Through the
        bucket's CUDA graph when the runner has them, else one eager forward."""
        if self.graphs is not None:
            logits, routes = self.graphs.run(batch)
            return logits, routes if routing else None
        out = self.forward(batch, routing)
        return out.logits[:, -1], torch.stack(out.routing)[:, :, 0] if routing else None

    def forward(self, batch: Batch, routing: bool = False, last: torch.Tensor | None = None):
        """The main model on the batch (r1pipe.model ModelOutput: logits [B, S, V], or [B, 1, V] at index last[b]
        of each row; hidden [B, S, D]; routing per MoE layer [B, S, k] when asked; see EngineModel.forward)."""
        self.cache.plan(batch.tables, batch.positions, batch.valid)
        return self.model.forward(batch.ids.to(self.device), batch.positions.to(self.device), self.cache,
                                  return_routing=routing, last=None if last is None else last.to(self.device))

    def mtp(self, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafting MTP module on main-model hidden states [B, S, D] of the tokens at batch.positions and
        batch.ids, the tokens one position later -> (its hidden [B, S, D], logits [B, S, V])."""
        self.cache.plan(batch.tables, batch.positions, batch.valid)
        return self.model.mtp_step(_DRAFTER, hidden, batch.ids.to(self.device), batch.positions.to(self.device),
                                   self.cache)
