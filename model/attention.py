"""Multi-head Latent Attention: a training path (K/V expanded from the latent) and an absorbed decode path.

The decode path caches only the normalised KV latent and the shared RoPE key; W_UK is folded into the query
(q_nope @ W_UK gives a query in latent space) and W_UV into the output, so K/V are never expanded.
Both paths compute the same attention and agree to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LatentCache
from .config import ModelConfig
from .linear import dense_weight, make_linear
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, prefix: str):
        super().__init__()
        c = config
        self.config, self.layer = c, layer
        self.n_heads = c.num_attention_heads
        fp8 = lambda name: c.fp8_for(f"{prefix}.{name}")  # noqa: E731
        if c.q_lora_rank is None:
            self.q_proj = make_linear(c.hidden_size, self.n_heads * c.qk_head_dim, fp8=fp8("q_proj"))
        else:
            self.q_a_proj = make_linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias, fp8=fp8("q_a_proj"))
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = make_linear(c.q_lora_rank, self.n_heads * c.qk_head_dim, fp8=fp8("q_b_proj"))
        self.kv_a_proj_with_mqa = make_linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                              bias=c.attention_bias, fp8=fp8("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = make_linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                     fp8=fp8("kv_b_proj"))
        self.o_proj = make_linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias, fp8=fp8("o_proj"))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, positions: Tensor,
                cache: LatentCache | None = None) -> Tensor:
        """x [B,S,D]; cos/sin [B,S,r/2]; mask [B,S,S] (True = may attend) for the training path, ignored with a
        cache (the cache supplies it); positions [B,S] (negative = padding) for the cache."""
        c = self.config
        B, S, _ = x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_heads, c.qk_head_dim)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope[:, :, None], cos, sin, c.rope_interleave)[:, :, 0]
        if cache is None:
            out = self._expanded(q_nope, q_rope, latent, k_rope, mask)
        else:
            latents, k_ropes, cache_mask = cache.update(self.layer, latent, k_rope, positions)
            out = self._absorbed(q_nope, q_rope, latents, k_ropes, cache_mask)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor, mask: Tensor | None) -> Tensor:
        c = self.config
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(B, S, H, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, c.qk_rope_head_dim)], dim=-1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None]
        dropout = c.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout,
                                             is_causal=mask is None, scale=c.softmax_scale)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, latents: Tensor, k_ropes: Tensor, mask: Tensor) -> Tensor:
        c = self.config
        H = self.n_heads
        w = dense_weight(self.kv_b_proj).view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latents.to(q_latent.dtype))
                  + torch.einsum("bshr,btr->bsht", q_rope, k_ropes.to(q_rope.dtype))).float() * c.softmax_scale
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        # a padded query may see no key at all: give it zero attention instead of NaN
        probs = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0).to(q_latent.dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, latents.to(probs.dtype))
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv.to(out_latent.dtype))
