"""make_linear: the one constructor of every projection, so an FP8 linear can replace nn.Linear by config."""
from __future__ import annotations

import torch
from torch import nn


def make_linear(in_features: int, out_features: int, bias: bool = False, fp8: bool = False) -> nn.Module:
    """A projection whose `.weight` is [out, in] (so checkpoint keys never change); FP8Linear when `fp8`."""
    if fp8:
        from .fp8 import FP8Linear  # owned by the FP8 path; imported only when asked for

        return FP8Linear(in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out, in] weight in high precision (dequantized for an FP8 linear), for weight absorption in MLA."""
    if hasattr(linear, "dequantized_weight"):
        return linear.dequantized_weight()
    return linear.weight
