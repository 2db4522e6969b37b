"""Rotary position embedding with DeepSeek's YaRN context extension (frequencies and attention factor)."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim/2] and the factor that scales cos/sin (YaRN's attention factor)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = config.yarn
    if y is None:
        return inv_freq, 1.0
    original = y["original_max_position_embeddings"]
    factor = y.get("factor") or config.max_position_embeddings / original
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # high-frequency dims keep their frequency (extrapolate), low-frequency ones are interpolated by `factor`
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = y.get("attention_factor")
    if attention_factor is None:
        if y.get("mscale") and y.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim/2] in float32."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B,S,H,d] by per-token angles cos/sin [B,S,d/2]; pairs are (2i, 2i+1) if interleave else (i, i+d/2).

    Interleaved fp32 pairs rotate as complex numbers, (x_2i + i x_2i+1) * (cos + i sin): one kernel on the
    pairs in place of six on strided halves (the same products and sums; 2-3x faster forward and backward). Not
    under torch.compile: the viewability check reads the storage offset, which tracing cannot (a graph break)."""
    if interleave and x.dtype == torch.float32 and not torch.compiler.is_compiling() and _pairs_viewable(x):
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * torch.complex(cos, sin)[:, :, None]).flatten(-2)
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _pairs_viewable(x: torch.Tensor) -> bool:
    """Whether x's (2i, 2i+1) pairs can be viewed as complex numbers in place: contiguous pairs at even offsets."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])
