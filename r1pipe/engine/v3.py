"""r1pipe's own DeepSeek-V3 (r1pipe.model.Transformer) in the engine: MLA over the paged latent cache (streams:
the KV latent, kv_lora_rank values, and the RoPE'd shared key, qk_rope_head_dim values), routing records, the
MTP module for self-speculation, FP8 weights and capture-safe decode steps."""
from __future__ import annotations

import dataclasses

import torch

from r1pipe.engine.adapter import EngineModel, ModelFacts
from r1pipe.engine.paged_cache import PagedCache
from r1pipe.model import ModelOutput, Transformer


class V3Model(EngineModel):
    """A r1pipe.model.Transformer as the engine runs it."""

    supports_fp8 = True
    supports_cuda_graphs = True

    def __init__(self, module: Transformer) -> None:
        c = module.config
        super().__init__(module, ModelFacts(
            model_type="deepseek_v3", vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
            eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_hidden_layers=c.num_hidden_layers,
            cache_widths=(c.kv_lora_rank, c.qk_rope_head_dim),
            num_moe_layers=sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)),
            num_experts_per_tok=c.num_experts_per_tok, num_nextn_predict_layers=c.num_nextn_predict_layers))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: PagedCache, return_routing: bool = False,
                last: torch.Tensor | None = None) -> ModelOutput:
        """ids / positions [B, S] -> ModelOutput (logits [B, S, V], or [B, 1, V] at `last` [B]; hidden
        [B, S, D]; routing per MoE layer [B, S, k] when asked)."""
        out = self.module(ids, positions=positions, cache=cache, return_routing=return_routing)
        if last is None:
            return out
        return dataclasses.replace(out, logits=out.logits[torch.arange(ids.shape[0], device=ids.device), last, None])

    def mtp_step(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 cache: PagedCache) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.mtp_step(k, hidden, next_ids, positions, cache=cache)
