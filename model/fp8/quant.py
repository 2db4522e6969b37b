"""Pure-torch reference of DeepSeek-V3's FP8 recipe: block quantization and the block-scaled GEMM.

Conventions shared by every path (reference and Triton):
- Format: float8_e4m3fn, largest finite value 448, values rounded to nearest, ties to even.
- A scale is the *dequantization multiplier* (what official checkpoints call `weight_scale_inv`):
  real ~= fp8 * scale, scale = max(amax, AMAX_FLOOR) / 448, optionally rounded up to a power of two.
- Activations (and output gradients) use 1x128 tiles along the inner (K) dimension: scales [M, ceil(K/128)].
- Weights use 128x128 blocks: scales [ceil(N/128), ceil(K/128)]. The last tile/block may be ragged.
- GEMM: per 128-wide K-chunk the FP8 x FP8 partial product is formed, multiplied by both scales,
  and added to an fp32 accumulator (the paper's promotion every N_C = 128 elements).
"""
from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
# Keeps all-zero tiles finite (scale stays a normal fp32 number, quantized values stay 0).
AMAX_FLOOR = 1e-12


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_from_amax(amax: Tensor, power_of_two: bool = False) -> Tensor:
    """fp32 dequantization scale for tiles whose largest magnitude is `amax`."""
    scale = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    if power_of_two:
        # Round up to 2^k on the bits (exact on every backend, unlike log2/exp2):
        # any nonzero mantissa carries into the exponent, then the mantissa is cleared.
        bits = scale.view(torch.int32)
        scale = ((bits + 0x7FFFFF) & ~0x7FFFFF).view(torch.float32)
    return scale


def to_fp8(scaled: Tensor) -> Tensor:
    """Saturate to +-448 and cast with torch's round-to-nearest-even."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def round_to_e4m3(x: Tensor) -> Tensor:
    """fp32 values rounded onto the E4M3 grid (nearest, ties to even), in fp32 arithmetic.

    The Triton kernels round this way before their final cast, so the cast itself is exact
    and every backend (GPU, Triton's interpreter, torch) gives the same bits.
    Input must already lie in [-448, 448].
    """
    x = x.float()
    magnitude = x.abs()
    exponent = ((magnitude.view(torch.int32) >> 23) & 0xFF) - 127
    # spacing of the E4M3 grid around |x|: 2^(e-3) for normals, 2^-9 in the subnormal range
    ulp_exponent = exponent.clamp_min(-6) - 3
    magic = ((ulp_exponent + 23 + 127) << 23).view(torch.float32)  # 2^(ulp_exponent + 23)
    rounded = (magnitude + magic) - magic  # fp32 add rounds to a multiple of the ulp (RNE)
    return torch.copysign(rounded, x)  # keeps -0.0 negative, as torch's cast does


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = cdiv(x.shape[-1], multiple) * multiple - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def act_quant_ref(x: Tensor, power_of_two: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize x[..., K] in 1x128 tiles along K. Returns (fp8 [..., K], fp32 scales [..., ceil(K/128)])."""
    k = x.shape[-1]
    tiles = _pad_last(x.float(), BLOCK).unflatten(-1, (-1, BLOCK))
    scale = scale_from_amax(tiles.abs().amax(dim=-1), power_of_two)
    q = to_fp8(tiles / scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return q, scale


def act_dequant_ref(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of act_quant_ref: q[..., K] times its 1x128 tile scales [..., ceil(K/128)], in fp32, as `dtype`."""
    k = q.shape[-1]
    return (q.float() * scale.float().repeat_interleave(BLOCK, -1)[..., :k]).to(dtype)


def weight_quant_ref(w: Tensor, power_of_two: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize w[N, K] in 128x128 blocks. Returns (fp8 [N, K], fp32 scales [ceil(N/128), ceil(K/128)])."""
    n, k = w.shape
    padded = _pad_last(_pad_last(w.float(), BLOCK).t(), BLOCK).t()
    nb, kb = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    scale = scale_from_amax(blocks.abs().amax(dim=(1, 3)), power_of_two)
    q = to_fp8(blocks / scale[:, None, :, None]).view(nb * BLOCK, kb * BLOCK)[:n, :k]
    return q.contiguous(), scale


def expand_block_scales(scale: Tensor, rows: int, cols: int, scale_rows: int = BLOCK) -> Tensor:
    """Per-element view [rows, cols] of scales given per (scale_rows x 128) block."""
    return scale.repeat_interleave(scale_rows, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def weight_dequant_ref(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of weight_quant_ref: q[N, K] * per-block scale, in fp32, then cast to `dtype`."""
    return (q.float() * expand_block_scales(scale, *q.shape)).to(dtype)


def fp8_gemm_ref(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                 out_dtype: torch.dtype = torch.float32, b_scale_rows: int = BLOCK) -> Tensor:
    """C[M, N] = A[M, K] @ B[N, K]^T with block scales, accumulated in fp32 per 128-wide K-chunk.

    a_scale: [M, ceil(K/128)] (1x128 tiles). b_scale: [ceil(N/b_scale_rows), ceil(K/128)]:
    b_scale_rows=128 for weight blocks, 1 for a second activation-like operand (weight gradients).
    """
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"inner dimensions differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    b_scale_per_row = b_scale.float().repeat_interleave(b_scale_rows, 0)[:n]  # [N, chunks]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for c in range(cdiv(k, BLOCK)):
        chunk = slice(c * BLOCK, min(k, (c + 1) * BLOCK))
        partial = a[:, chunk].float() @ b[:, chunk].float().t()  # products of E4M3 values are exact in fp32
        acc += partial * a_scale[:, c : c + 1].float() * b_scale_per_row[:, c][None, :]
    return acc.to(out_dtype)


def fp8_grouped_gemm_ref(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, group: Tensor,
                         out_dtype: torch.dtype = torch.float32) -> Tensor:
    """C[g] = A[g] @ B[group[g]]^T for G groups of rows, each against one of E weights, as fp8_gemm_ref does it.

    a [G, M, K] fp8 with 1x128 tile scales a_scale [G, M, ceil(K/128)]; b [E, N, K] fp8 with 128x128 block
    scales b_scale [E, ceil(N/128), ceil(K/128)]; group [G] (on the device) -> [G, M, N] `out_dtype`."""
    (G, m, k), n = a.shape, b.shape[1]
    if b.shape[2] != k:
        raise ValueError(f"inner dimensions differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    b_scale_per_row = b_scale.float().repeat_interleave(BLOCK, 1)[:, :n].index_select(0, group)  # [G, N, chunks]
    acc = torch.zeros(G, m, n, dtype=torch.float32, device=a.device)
    for c in range(cdiv(k, BLOCK)):
        chunk = slice(c * BLOCK, min(k, (c + 1) * BLOCK))
        partial = torch.bmm(a[:, :, chunk].float(), b[:, :, chunk].float().index_select(0, group).transpose(1, 2))
        acc += partial * a_scale[:, :, c : c + 1].float() * b_scale_per_row[:, None, :, c]
    return acc.to(out_dtype)
