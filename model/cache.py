"""The latent KV cache: per token and layer only the normalised KV latent and the shared RoPE'd key.

MLA needs exactly kv_lora_rank + qk_rope_head_dim values per token per layer (576 for V3, against
2 * 128 heads * 192/128 for the equivalent multi-head cache). Layer index num_hidden_layers + i is MTP module i.
Positions are slot indices; a negative position marks a padded token, which is neither stored nor attended.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .config import ModelConfig


@runtime_checkable
class LatentCache(Protocol):
    def update(self, layer: int, kv_latent: Tensor, k_rope: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store kv_latent [B,S,kv_lora_rank] and k_rope [B,S,qk_rope_head_dim] at `positions` [B,S] (slots;
        negative = padding, not stored) and return (latents [B,T,c], k_ropes [B,T,r], mask [B,S,T]) where
        mask is True where query s may attend key t (t stored and not after the query's position)."""
        ...

    # A cache may also offer attend(layer, q_latent, q_rope, kv_latent, k_rope, scale) -> out_latent [B,S,H,C]:
    # store as `update` does and compute the absorbed attention itself (the engine's paged cache reads its
    # blocks in place through the block table); MLA then uses it instead of update + absorbed_attention.


class DenseLatentCache:
    """Preallocated [layers, B, max_len, ...] tensors; `filled` remembers which slots hold a real token."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        layers = config.num_layers_with_mtp
        self.max_len = max_len
        self.kv_latent = torch.zeros(layers, batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(layers, batch_size, max_len, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.filled = torch.zeros(layers, batch_size, max_len, dtype=torch.bool, device=device)
        self.length = [0] * layers  # one past the highest slot written, per layer

    def update(self, layer: int, kv_latent: Tensor, k_rope: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch = kv_latent.shape[0]
        real = positions >= 0
        if not real.all():
            kv_latent, k_rope = kv_latent[real], k_rope[real]
        rows = torch.arange(batch, device=positions.device)[:, None].expand_as(positions)[real]
        slots = positions[real]
        if slots.numel():
            top = int(slots.max()) + 1
            if top > self.max_len:
                raise IndexError(f"position {top - 1} is beyond the cache's max_len {self.max_len}")
            self.length[layer] = max(self.length[layer], top)
        self.kv_latent[layer, rows, slots] = kv_latent.reshape(-1, kv_latent.shape[-1]).to(self.kv_latent.dtype)
        self.k_rope[layer, rows, slots] = k_rope.reshape(-1, k_rope.shape[-1]).to(self.k_rope.dtype)
        self.filled[layer, rows, slots] = True
        T = max(self.length[layer], 1)
        key_pos = torch.arange(T, device=positions.device)
        mask = self.filled[layer, :batch, None, :T] & (key_pos <= positions[:, :, None])
        return self.kv_latent[layer, :batch, :T], self.k_rope[layer, :batch, :T], mask

    def reset(self) -> None:
        self.filled.zero_()
        self.length = [0] * len(self.length)
