"""Triton kernel: absorbed MLA attention read straight from the paged latent cache (FlashMLA-style).

Each program takes one query token (row b, position p) and a tile of heads; it walks the row's keys 0..p
in tiles, finding each key's slot through the block table (slot = table[b, t // block_size] * block_size +
t % block_size), and accumulates an online softmax over

    score[h, t] = (q_latent[h] . kv[slot(t)] + q_rope[h] . pe[slot(t)]) * scale,   out[h] = sum_t p[h, t] kv[slot(t)]

so the cache is never gathered into a dense per-row copy. Imported only where triton is (the engine falls
back to the torch path otherwise); on CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_mla_kernel(QL, QR, KV, PE, TABLE, POS, OUT, stride_ql_t, stride_ql_h, stride_qr_t, stride_qr_h,
                      stride_table, stride_out_t, stride_out_h, S, H, C, R, scale,
                      BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    tok = tl.program_id(0)  # b * S + s
    b = tok // S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    hmask, cmask, rmask = heads < H, c < C, r < R
    ql = tl.load(QL + tok * stride_ql_t + heads[:, None] * stride_ql_h + c[None, :],
                 mask=hmask[:, None] & cmask[None, :], other=0.0)
    qr = tl.load(QR + tok * stride_qr_t + heads[:, None] * stride_qr_h + r[None, :],
                 mask=hmask[:, None] & rmask[None, :], other=0.0)
    n_keys = tl.load(POS + tok) + 1  # padding queries hold position -1: no keys
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < n_keys
        block = tl.load(TABLE + b * stride_table + t // BLOCK_SIZE, mask=tmask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
        kv = tl.load(KV + slot[:, None] * C + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        pe = tl.load(PE + slot[:, None] * R + r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
        s = (tl.dot(ql, tl.trans(kv), input_precision=PRECISION)
             + tl.dot(qr, tl.trans(pe), input_precision=PRECISION)) * scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(OUT + tok * stride_out_t + heads[:, None] * stride_out_h + c[None, :],
             out.to(OUT.dtype.element_ty), mask=hmask[:, None] & cmask[None, :])


def paged_mla(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
              table: torch.Tensor, query_pos: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q_latent [B, S, H, C], q_rope [B, S, H, R]; kv [slots, C] and pe [slots, R] one layer's pool;
    table [B, max_blocks] block ids; query_pos [B, S] each query's position (-1: padding, output 0).
    A query at position p attends its row's keys 0..p. -> out_latent [B, S, H, C] in q_latent's dtype."""
    B, S, H, C = q_latent.shape
    R = q_rope.shape[-1]
    ql = q_latent.reshape(B * S, H, C).contiguous()
    qr = q_rope.reshape(B * S, H, R).to(ql.dtype).contiguous()
    kv, pe = kv.to(ql.dtype).contiguous(), pe.to(ql.dtype).contiguous()
    table = table.to(torch.int32).contiguous()
    pos = query_pos.reshape(B * S).to(torch.int32).contiguous()
    out = torch.empty_like(ql)
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    grid = (B * S, triton.cdiv(H, block_h))
    _paged_mla_kernel[grid](
        ql, qr, kv, pe, table, pos, out, ql.stride(0), ql.stride(1), qr.stride(0), qr.stride(1), table.stride(0),
        out.stride(0), out.stride(1), S, H, C, R, scale, BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_N=16,
        BLOCK_C=triton.next_power_of_2(C), BLOCK_R=max(16, triton.next_power_of_2(R)),
        PRECISION="ieee")
    return out.view(B, S, H, C)
