"""Multi-head Latent Attention: a training path (K/V expanded from the latent) and an absorbed decode path.

The decode path caches only the normalised KV latent and the shared RoPE key; W_UK is folded into the query
(q_nope @ W_UK gives a query in latent space) and W_UV into the output, so K/V are never expanded.
Both paths compute the same attention and agree to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | SharedPrefix | None, positions: Tensor,
                cache: LatentCache | None = None) -> Tensor:
        """x [B,S,D]; cos/sin [B,S,r/2]; mask [B,S,S] (True = may attend; None: causal) or a SharedPrefix (packed
        rows) for the training path, ignored with a cache (the cache supplies it); positions [B,S] (negative =
        padding) for the cache."""
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
            out = self._absorbed(q_nope, q_rope, latent, k_rope, positions, cache)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor,
                  mask: Tensor | SharedPrefix | None) -> Tensor:
        c = self.config
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(B, S, H, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, c.qk_rope_head_dim)], dim=-1)
        dropout = c.attention_dropout if self.training else 0.0
        if isinstance(mask, SharedPrefix):
            return mask.attention(q, k, v, c.softmax_scale, dropout)
        return sdpa(q, k, v, mask, c.softmax_scale, dropout)

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor, positions: Tensor,
                  cache: LatentCache) -> Tensor:
        """W_UK folded into the query, attention over the cached latents, W_UV applied to the result. A cache
        with `attend` (the engine's paged cache) computes the attention itself, reading its blocks in place;
        any other cache hands back its keys and the attention runs here."""
        c = self.config
        B, S, H, _ = q_nope.shape
        w = dense_weight(self.kv_b_proj).view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]
        # per head: [H, B*S, d] @ [H, d, C] (bmm over the heads; an einsum here costs more than the product)
        q_latent = per_head(q_nope, w_uk.to(q_nope.dtype))
        attend = getattr(cache, "attend", None)
        if attend is not None:
            out_latent = attend(self.layer, q_latent, q_rope, latent, k_rope, c.softmax_scale)
        else:
            latents, k_ropes, mask = cache.update(self.layer, latent, k_rope, positions)
            out_latent = absorbed_attention(q_latent, q_rope, latents, k_ropes, mask, c.softmax_scale)
        return per_head(out_latent.to(q_latent.dtype), w_uv.to(q_latent.dtype).transpose(1, 2))


def per_head(x: Tensor, w: Tensor) -> Tensor:
    """x [B,S,H,i] times each head's own w [H,i,o] -> [B,S,H,o]."""
    B, S, H, i = x.shape
    return torch.bmm(x.reshape(B * S, H, i).transpose(0, 1), w).transpose(0, 1).reshape(B, S, H, -1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout: float = 0.0) -> Tensor:
    """q, k [B,S,H,d], v [B,T,H,dv]; mask [B,S,T] (True: may attend; None: causal) -> [B,S,H,dv]."""
    dv = v.shape[-1]
    # torch's fused CPU attention needs V's head dim equal to Q's, else it materialises the scores: in fp32
    # padding V is faster (bench/bench_train.py 1.02x -> 1.15x transformers); in bf16 it is slower (0.97x -> 0.87x)
    pad = q.shape[-1] - dv if v.device.type == "cpu" and q.dtype == torch.float32 else 0
    if pad > 0:
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if mask is None else mask[:, None], dropout_p=dropout,
                                         is_causal=mask is None, scale=scale)
    return out[..., :dv].transpose(1, 2)


@dataclass
class SharedPrefix:
    """Packed rows whose tokens are a shared prompt followed by several rows' completions
    (r1pipe.workers.packing), attended as the unpacked rows were: each prompt token over the prompt up to
    itself, each completion token over the whole prompt and its own completion up to itself. Instead of one
    mask over the packed row (quadratic in all its completions), the prompts attend among themselves and each
    completion attends [its prompt's keys, its own keys]: the work of the unpacked rows, the prompt once.

    Indices are flat into the packed [G*L] tokens. Prompts: G rows of P slots (prompt_index, padding 0),
    prompt_mask [G,P,P]; completions: N rows of C slots (row_index), row_group [N] their packed row,
    row_mask [N,C,P+C] over [prompt keys, own keys]. *_take pick the real slots of the flattened
    [G*P] / [N*C] results and *_dest say where they go among the G*L tokens (the rest, padding, get 0)."""

    prompt_index: Tensor
    prompt_mask: Tensor
    prompt_take: Tensor
    prompt_dest: Tensor
    row_index: Tensor
    row_group: Tensor
    row_mask: Tensor
    row_take: Tensor
    row_dest: Tensor

    def attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float = 0.0) -> Tensor:
        """q, k [G,L,H,d], v [G,L,H,dv] of the packed rows -> attention output [G,L,H,dv]."""
        G, L, H, _ = q.shape
        flat = lambda t, index: t.reshape(G * L, H, -1).index_select(0, index.reshape(-1)).view(*index.shape, H, -1)  # noqa: E731
        kp, vp = flat(k, self.prompt_index), flat(v, self.prompt_index)
        prompt_out = sdpa(flat(q, self.prompt_index), kp, vp, self.prompt_mask, scale, dropout)
        keys = torch.cat([kp.index_select(0, self.row_group), flat(k, self.row_index)], dim=1)
        values = torch.cat([vp.index_select(0, self.row_group), flat(v, self.row_index)], dim=1)
        row_out = sdpa(flat(q, self.row_index), keys, values, self.row_mask, scale, dropout)
        out = q.new_zeros(G * L, H, v.shape[-1])
        out = out.index_copy(0, self.prompt_dest, prompt_out.reshape(-1, H, v.shape[-1]).index_select(0, self.prompt_take))
        out = out.index_copy(0, self.row_dest, row_out.reshape(-1, H, v.shape[-1]).index_select(0, self.row_take))
        return out.view(G, L, H, -1)


def absorbed_attention(q_latent: Tensor, q_rope: Tensor, latents: Tensor, k_ropes: Tensor, mask: Tensor,
                       scale: float) -> Tensor:
    """Attention in latent space: q_latent [B,S,H,C] against latents [B,T,C] plus q_rope [B,S,H,R] against the
    shared rope keys k_ropes [B,T,R] -> out_latent [B,S,H,C]. mask: [B,S,T] bool (True: may attend), or its
    `attention_bias` when many layers share one mask. A query that may attend to no key (padding) gets a
    finite, meaningless output."""
    B, S, H, C = q_latent.shape
    T = latents.shape[1]
    bias = mask if mask.is_floating_point() else attention_bias(mask)
    scores = torch.baddbmm(torch.bmm(q_latent.reshape(B, S * H, C), latents.to(q_latent.dtype).transpose(1, 2)),
                           q_rope.reshape(B, S * H, -1), k_ropes.to(q_rope.dtype).transpose(1, 2))  # [B, S*H, T]
    scores = torch.add(bias, scores.view(B, S, H, T).float(), alpha=scale)  # bias + scale * scores, in float32
    probs = scores.softmax(dim=-1).to(q_latent.dtype)
    return torch.bmm(probs.view(B, S * H, T), latents.to(probs.dtype)).view(B, S, H, C)


def attention_bias(mask: Tensor) -> Tensor:
    """mask [B,S,T] bool (True: may attend) -> the float32 bias added to the scores, [B,S,1,T]: 0 where a query
    may attend and the lowest float where it may not (its exp is exactly 0, and a row of no keys stays finite)."""
    bias = torch.zeros(mask.shape[0], mask.shape[1], 1, mask.shape[2], dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask[:, :, None], torch.finfo(torch.float32).min)
