"""Triton kernels for FP8 block quantization and the block-scaled GEMM (semantics in quant.py).

Every kernel rounds onto the E4M3 grid itself (round-to-nearest-even in fp32 arithmetic, as
quant.round_to_e4m3) before the final cast, so the cast only re-encodes exact values: the GPU's
cvt and Triton's interpreter (whose own float->fp8 cast drops sticky bits and can lose the
mantissa carry) then give the same bits as torch. Divisions use div_rn (IEEE) for the same reason.
The kernels run on a CUDA GPU, and on CPU tensors under TRITON_INTERPRET=1 for tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, cdiv

# jit'ed code may only read globals declared constexpr
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _scale_from_amax(amax, POWER_OF_TWO: tl.constexpr):
    scale = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
    if POWER_OF_TWO:
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & -8388608).to(tl.float32, bitcast=True)  # -8388608 == ~0x7FFFFF
    return scale


@triton.jit
def _to_fp8(x):
    """Saturate to +-448, round to nearest even on the E4M3 grid, cast (exact)."""
    x = tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX)
    mag = tl.abs(x)
    exponent = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3
    magic = ((ulp_exponent + 150) << 23).to(tl.float32, bitcast=True)
    rounded = (mag + magic) - magic
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # keeps -0.0 negative, as torch's cast does
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                     ROWS: tl.constexpr, POWER_OF_TWO: tl.constexpr):
    """One program: ROWS rows x one 128-wide tile of K."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    cols = tile * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.abs(x), axis=1), POWER_OF_TWO)
    q = _to_fp8(tl.math.div_rn(x, scale[:, None]))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + tile, scale, mask=rows < M)


@triton.jit
def weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_qn, stride_sn,
                        POWER_OF_TWO: tl.constexpr):
    """One program: one 128x128 block."""
    bn, bk = tl.program_id(0), tl.program_id(1)
    rows = bn * 128 + tl.arange(0, 128)
    cols = bk * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POWER_OF_TWO)
    q = _to_fp8(tl.math.div_rn(w, scale))
    tl.store(q_ptr + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
    tl.store(s_ptr + bn * stride_sn + bk, scale)


@triton.jit
def weight_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, stride_qn, stride_wn, stride_sn):
    bn, bk = tl.program_id(0), tl.program_id(1)
    rows = bn * 128 + tl.arange(0, 128)
    cols = bk * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + bn * stride_sn + bk)
    tl.store(w_ptr + rows[:, None] * stride_wn + cols[None, :], (q * scale).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K,
                    stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                    B_SCALE_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B^T; A [M,K], B [N,K] fp8 (K contiguous); scales per 128-wide K-chunk, fp32 accumulator."""
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    # grouped program order: consecutive programs share B tiles in L2
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    # out-of-range rows/cols wrap around (their results are never stored), so loads need no mask
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    a_s_ptrs = a_s_ptr + offs_m * stride_asm
    b_s_ptrs = b_s_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - chunk * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + chunk)
        b_s = tl.load(b_s_ptrs + chunk)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


# One tile shape for every GEMM. An H100 autotuning run over 16 shapes (64/128/256-row and -column tiles,
# 4/8 warps, 3-5 stages) at 4096-8192 picked this one at every size (docs/fp8.md). No per-shape autotuning:
# weight-gradient GEMMs reduce over the tokens each expert receives, a length that changes every step.
GPU_TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def act_quant(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> fp8 [M, K], scales [M, ceil(K/128)]."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, cdiv(k, BLOCK), dtype=torch.float32, device=x.device)
    rows = 4 if _interpreting(x) else 32
    act_quant_kernel[(cdiv(m, rows), cdiv(k, BLOCK))](
        x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), ROWS=rows, POWER_OF_TWO=power_of_two)
    return q, s


def weight_quant(w: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> fp8 [N, K], scales [ceil(N/128), ceil(K/128)]."""
    w = w.contiguous()
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(cdiv(n, BLOCK), cdiv(k, BLOCK), dtype=torch.float32, device=w.device)
    weight_quant_kernel[(cdiv(n, BLOCK), cdiv(k, BLOCK))](
        w, q, s, n, k, w.stride(0), q.stride(0), s.stride(0), POWER_OF_TWO=power_of_two)
    return q, s


def weight_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    q, scale = q.contiguous(), scale.float().contiguous()
    n, k = q.shape
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    weight_dequant_kernel[(cdiv(n, BLOCK), cdiv(k, BLOCK))](q, scale, w, n, k, q.stride(0), w.stride(0), scale.stride(0))
    return w


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, b_scale_rows: int = BLOCK) -> torch.Tensor:
    """C [M, N] = A [M, K] @ B [N, K]^T, block-scaled (see quant.fp8_gemm_ref)."""
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"inner dimensions differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    args = (a, b, c, a_scale, b_scale, m, n, k, a.stride(0), b.stride(0), c.stride(0), a_scale.stride(0), b_scale.stride(0))
    if _interpreting(a):
        # small fixed tiles: the interpreter runs programs one by one in numpy
        block_m, block_n = 16, 32
        fp8_gemm_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
            *args, B_SCALE_ROWS=b_scale_rows, EVEN_K=k % BLOCK == 0, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=4)
    else:
        grid = (cdiv(m, GPU_TILE["BLOCK_M"]) * cdiv(n, GPU_TILE["BLOCK_N"]),)
        fp8_gemm_kernel[grid](*args, B_SCALE_ROWS=b_scale_rows, EVEN_K=k % BLOCK == 0, **GPU_TILE)
    return c
