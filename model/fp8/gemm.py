"""Backend dispatch for the FP8 ops: Triton kernels on CUDA tensors, the torch reference elsewhere.

backend="auto" picks, for CUDA tensors, cuBLAS's block-wise scaled GEMM (torch._scaled_mm with
1x128 / 128x128 fp32 scales, same semantics, faster than our Triton GEMM on H100) where this torch
supports it, else the Triton kernels; the torch reference for CPU tensors. "cublas", "triton" and
"torch" force one. cuBLAS writes bf16/fp16, so fp32-output GEMMs (weight gradients) use Triton. "triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton's first import.
Both backends give the same bits for quantization and agree to fp32 summation order in the GEMM.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

from . import quant

BACKENDS = ("auto", "torch", "triton", "cublas")


@functools.cache
def _triton_kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:  # triton missing (e.g. macOS): the reference serves every call
        return None
    return kernels


def _kernels_for(t: Tensor, backend: str) -> ModuleType | None:
    """The Triton module to use for tensor t, or None for the torch reference."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not t.is_cuda):
        return None
    if backend == "cublas":
        raise ValueError("backend 'cublas' exists for fp8_gemm only")
    kernels = _triton_kernels()
    if kernels is None:
        if backend == "triton":
            raise RuntimeError("FP8 backend 'triton' requested but triton is not installed")
        return None
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton FP8 kernels on CPU tensors need TRITON_INTERPRET=1 set before importing triton")
    return kernels


def act_quant(x: Tensor, power_of_two: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """x [..., K] -> (fp8 [..., K], fp32 scales [..., ceil(K/128)]) in 1x128 tiles."""
    kernels = _kernels_for(x, backend)
    if kernels is None:
        return quant.act_quant_ref(x, power_of_two)
    q, s = kernels.act_quant(x.reshape(-1, x.shape[-1]), power_of_two)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def act_dequant(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """fp8 [..., K] with 1x128 tile scales -> `dtype` (elementwise; the same torch ops on every device)."""
    return quant.act_dequant_ref(q, scale, dtype)


def requant_along_rows(q: Tensor, scale: Tensor, power_of_two: bool = False, backend: str = "auto"
                       ) -> tuple[Tensor, Tensor]:
    """An [M, K] operand cached in 1x128 tiles along K -> its transpose [K, M] in 1x128 tiles along M.

    The V3 recipe's re-tiling for the weight gradient: dequantize, transpose, quantize again (the activation
    is cached in FP8, so it rounds twice; the alternative is to keep the 16/32-bit activation alive)."""
    return act_quant(act_dequant(q, scale).t().contiguous(), power_of_two, backend)


def weight_quant(w: Tensor, power_of_two: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scales [ceil(N/128), ceil(K/128)]) in 128x128 blocks."""
    kernels = _kernels_for(w, backend)
    return quant.weight_quant_ref(w, power_of_two) if kernels is None else kernels.weight_quant(w, power_of_two)


def weight_dequant(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
    """fp8 [N, K] with block scales -> `dtype` [N, K]."""
    kernels = _kernels_for(q, backend)
    return quant.weight_dequant_ref(q, scale, dtype) if kernels is None else kernels.weight_dequant(q, scale, dtype)


def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype = torch.float32,
             b_scale_rows: int = quant.BLOCK, backend: str = "auto") -> Tensor:
    """C [M, N] = A [M, K] @ B [N, K]^T with A in 1x128 tiles and B in (b_scale_rows x 128) blocks."""
    if a.dtype != quant.FP8_DTYPE or b.dtype != quant.FP8_DTYPE:
        raise TypeError(f"fp8_gemm expects float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    # cuBLAS writes bf16/fp16 only: fp32 results (weight gradients) stay on the Triton kernel
    use_cublas = backend == "auto" and out_dtype != torch.float32 and cublas_blockwise_supported(a, b, b_scale_rows)
    if backend == "cublas" or use_cublas:
        return _cublas_gemm(a, a_scale, b, b_scale, out_dtype, b_scale_rows)
    kernels = _kernels_for(a, backend)
    if kernels is None:
        return quant.fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype, b_scale_rows)
    return kernels.fp8_gemm(a, a_scale, b, b_scale, out_dtype, b_scale_rows)


def _cublas_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype,
                 b_scale_rows: int) -> Tensor:
    """torch._scaled_mm with block-wise scales; layouts as torch's ScaledBlas checks them:
    A's 1x128 scales [M, K/128] M-major; B passed as [K, N] column-major, its scales transposed."""
    a_scale = a_scale.float().t().contiguous().t()
    b_scale = b_scale.float().t() if b_scale_rows == quant.BLOCK else b_scale.float().t().contiguous()
    dtype = torch.bfloat16 if out_dtype == torch.float32 else out_dtype
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), a_scale, b_scale, out_dtype=dtype).to(out_dtype)


@functools.cache
def _cublas_probe(device: torch.device, b_scale_rows: int) -> bool:
    """Whether this torch/cuBLAS runs block-wise scaled GEMMs with this scale layout (checked once)."""
    if not hasattr(torch, "_scaled_mm") or os.environ.get("R1PIPE_FP8_NO_CUBLAS") == "1":
        return False
    a = torch.ones(128, 256, device=device).to(quant.FP8_DTYPE)
    b = torch.ones(128, 256, device=device).to(quant.FP8_DTYPE)
    sa = torch.full((128, 2), 2.0, device=device)
    sb = torch.full((1 if b_scale_rows == quant.BLOCK else 128, 2), 0.5, device=device)
    try:
        out = _cublas_gemm(a, sa, b, sb, torch.float32, b_scale_rows)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(out == 256.0))


def cublas_blockwise_supported(a: Tensor, b: Tensor, b_scale_rows: int = quant.BLOCK) -> bool:
    """cuBLAS's block-wise path needs CUDA tensors, whole 128-chunks of K and 16-aligned M, N."""
    m, k = a.shape
    n = b.shape[0]
    if not (a.is_cuda and k % quant.BLOCK == 0 and m % 16 == 0 and n % 16 == 0):
        return False
    return _cublas_probe(a.device, b_scale_rows)
