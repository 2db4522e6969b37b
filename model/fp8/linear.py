"""FP8Linear: a drop-in nn.Linear whose three GEMMs (forward, dgrad, wgrad) run block-scaled in FP8.

Training (the DeepSeek-V3 recipe): `weight` stays an fp32 (or bf16) master parameter; each forward
quantizes it in 128x128 blocks and the input in 1x128 tiles; backward quantizes the output
gradient in 1x128 tiles along the inner dimension of each GEMM:
  forward  y  = x  @ W^T : x tiles along K,  W blocks
  dgrad    dx = dy @ W   : dy tiles along N, the forward's W blocks transposed (128x128 is symmetric)
  wgrad    dW = dy^T @ x : dy^T and x^T tiles along M (tokens), both 1x128
For wgrad only the forward's FP8 copy of x (1 byte per value + a scale per 128) is kept, not x itself: it
is dequantized, transposed and quantized along the tokens (the V3 paper's caching of FP8 activations).
Under torch.autocast the input is cast to the autocast dtype first, so forward and dgrad write 16-bit outputs
(which cuBLAS's block-scaled GEMM serves on CUDA).
Gradients come back in the input's and the master weight's dtype; the optimizer never sees FP8.
Inference from official FP8 checkpoints: `load_fp8_weight` keeps `weight` as float8_e4m3fn with a
`weight_scale_inv` buffer (the dequantization multiplier per 128x128 block), state-dict keys as in
the checkpoint, and computes through the same GEMM without ever dequantizing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import gemm
from .quant import FP8_DTYPE


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_scale: Tensor | None, power_of_two: bool, backend: str):
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        if weight.dtype == FP8_DTYPE:
            qw, sw = weight, weight_scale
        else:
            qw, sw = gemm.weight_quant(weight, power_of_two, backend)
        qx, sx = gemm.act_quant(x2d, power_of_two, backend)
        y = gemm.fp8_gemm(qx, sx, qw, sw, x.dtype, backend=backend)
        if weight.requires_grad:  # wgrad re-tiles the FP8 copy of x (see the module docstring)
            ctx.save_for_backward(qx, sx, qw, sw)
        else:
            ctx.save_for_backward(None, None, qw, sw)
        ctx.power_of_two, ctx.backend = power_of_two, backend
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qx, sx, qw, sw = ctx.saved_tensors
        pow2, backend = ctx.power_of_two, ctx.backend
        g2d = grad_out.reshape(-1, qw.shape[0])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            qg, sg = gemm.act_quant(g2d, pow2, backend)  # tiles along N, the inner dim of dgrad
            grad_x = gemm.fp8_gemm(qg, sg, qw.t().contiguous(), sw.t().contiguous(), grad_out.dtype, backend=backend)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            qgt, sgt = gemm.act_quant(g2d.t().contiguous(), pow2, backend)  # tiles along tokens
            qxt, sxt = gemm.requant_along_rows(qx, sx, pow2, backend)
            grad_w = gemm.fp8_gemm(qgt, sgt, qxt, sxt, torch.float32, b_scale_rows=1, backend=backend)
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None, bias: Tensor | None = None,
               power_of_two: bool = False, backend: str = "auto") -> Tensor:
    """y = x @ weight^T + bias through block-scaled FP8 GEMMs (differentiable in x and a high-precision weight).

    weight: a high-precision master [out, in] (quantized on the fly), or float8_e4m3fn with
    `weight_scale` [ceil(out/128), ceil(in/128)] holding dequantization multipliers.
    """
    if weight.dtype == FP8_DTYPE and weight_scale is None:
        raise ValueError("an FP8 weight needs its weight_scale (weight_scale_inv in checkpoints)")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.numel() == 0:  # nothing to quantize; keep shapes and autograd
        y = x @ torch.zeros_like(weight, dtype=x.dtype).t()
    else:
        y = _FP8LinearFunction.apply(x, weight, weight_scale, power_of_two, backend)
    return y if bias is None else y + bias.to(y.dtype)


class FP8Linear(nn.Linear):
    """nn.Linear computing in block-scaled FP8; same `weight`/`bias` parameters and state-dict keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, power_of_two_scales: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.power_of_two_scales = power_of_two_scales
        self.backend = backend
        # a None buffer stays out of the state dict until FP8 weights are loaded
        self.register_buffer("weight_scale_inv", None)

    @property
    def holds_fp8_weight(self) -> bool:
        return self.weight.dtype == FP8_DTYPE

    def load_fp8_weight(self, weight: Tensor, weight_scale_inv: Tensor) -> None:
        """Hold `weight` (float8_e4m3fn [out, in]) and its block scales instead of a master weight (inference)."""
        expected = ((self.out_features + 127) // 128, (self.in_features + 127) // 128)
        if weight.dtype != FP8_DTYPE or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected float8_e4m3fn weight {(self.out_features, self.in_features)}, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        if tuple(weight_scale_inv.shape) != expected:
            raise ValueError(f"expected weight_scale_inv of shape {expected}, got {tuple(weight_scale_inv.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = weight_scale_inv.float().to(weight.device)

    def quantize_weight_(self) -> None:
        """Replace the master weight by its FP8 blocks (halves weight memory against bf16; inference only)."""
        if not self.holds_fp8_weight:
            q, s = gemm.weight_quant(self.weight.detach(), self.power_of_two_scales, self.backend)
            self.load_fp8_weight(q, s)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.holds_fp8_weight:
            return gemm.weight_dequant(self.weight, self.weight_scale_inv, dtype, self.backend)
        return self.weight.to(dtype)

    def _apply(self, fn, recurse=True):
        """Module.to(dtype)/.half() would cast FP8 weights and scales like any float tensor: keep their dtypes."""
        if not self.holds_fp8_weight:
            return super()._apply(fn, recurse)
        weight, scale = self.weight.detach(), self.weight_scale_inv  # detach: survives param.data swaps
        super()._apply(fn, recurse)  # moves (and may cast) the bias as for any linear
        self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        self.weight_scale_inv = scale.to(self.weight.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.power_of_two_scales, self.backend)

    def extra_repr(self) -> str:
        mode = "fp8 weights" if self.holds_fp8_weight else "fp8 compute"
        return f"{super().extra_repr()}, {mode}"


@torch.no_grad()
def set_fp8_weight(weight: Tensor, scale: Tensor, value: Tensor, backend: str = "auto") -> None:
    """Write a high-precision weight `value` [out, in] into a held FP8 weight in place: quantized in 128x128
    blocks into `weight` (float8_e4m3fn [out, in]) and its dequantization scales `scale` (how engine weight
    updates and weight syncs reach FP8 weights: quantized on the way in)."""
    if tuple(value.shape) != tuple(weight.shape):
        raise ValueError(f"FP8 weight update: shape {tuple(value.shape)} vs {tuple(weight.shape)}")
    q, s = gemm.weight_quant(value.to(weight.device), backend=backend)
    weight.copy_(q)
    scale.copy_(s)


__all__ = ["FP8Linear", "fp8_linear", "set_fp8_weight"]
