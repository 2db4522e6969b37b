"""What the engine needs of a model family, behind one small interface.

An `EngineModel` holds the torch module the engine runs (its state-dict names are the checkpoint's, so
`LLM.update_weights` and the weight sync address it by the trainer's names) and exposes its forward over
the paged cache, the cache geometry (layers and the widths of the two per-token streams) and the config
facts the engine reads (vocabulary, context, EOS / padding ids, MoE and MTP layout). r1pipe.engine.v3 adapts
r1pipe's DeepSeek-V3, r1pipe.engine.dense the transformers Llama / Qwen2 models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from r1pipe.engine.paged_cache import PagedCache
from r1pipe.model import ModelOutput


@dataclass(frozen=True)
class ModelFacts:
    """The config facts the engine reads, whatever the family. eos_token_id: one id, several, or None;
    cache_heads, cache_widths: heads per token and cached layer of the cache's two streams, and values per head."""

    model_type: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    num_hidden_layers: int
    cache_widths: tuple[int, int]
    cache_heads: int = 1
    num_moe_layers: int = 0
    num_experts_per_tok: int = 1
    num_nextn_predict_layers: int = 0

    @property
    def padding_id(self) -> int:
        """An id to pad training batches with (any valid id: padded positions are masked out): the pad id,
        else the (first) EOS id, else 0."""
        eos = self.eos_token_id[0] if isinstance(self.eos_token_id, (list, tuple)) and self.eos_token_id \
            else self.eos_token_id
        for candidate in (self.pad_token_id, eos):
            if isinstance(candidate, int):
                return candidate
        return 0


class EngineModel:
    """A model family as the engine runs it. `module`: the torch module (weights, train/eval, device);
    `facts`: its ModelFacts. Capabilities a family lacks are refused by the engine with a clear error."""

    supports_fp8 = False  # LLM(fp8=True): FP8 projection weights
    supports_cuda_graphs = False  # decode steps replayed from CUDA graphs (capture-safe forward)

    def __init__(self, module: nn.Module, facts: ModelFacts) -> None:
        self.module, self.facts = module, facts

    @property
    def config(self):
        """The module's own config object (r1pipe ModelConfig or a transformers config)."""
        return self.module.config

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: PagedCache, return_routing: bool = False,
                last: torch.Tensor | None = None) -> ModelOutput:
        """ids / positions [B, S] over the planned cache -> ModelOutput: logits [B, S, V] float32, or with
        `last` [B] only those at index last[b] of each row, [B, 1, V]; hidden [B, S, D] (the final normed hidden
        state; None for a family without MTP); routing: expert ids [B, S, k] per MoE layer when asked ([] for
        a model without MoE layers)."""
        raise NotImplementedError

    def mtp_step(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 cache: PagedCache) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k on hidden [B, S, D] and the next ids [B, S] -> (its hidden [B, S, D], logits [B, S, V])."""
        raise NotImplementedError(f"{self.facts.model_type} has no MTP module")
