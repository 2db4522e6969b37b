"""Routed experts held stacked ([E, ...] parameters) and run as grouped GEMMs.

Memory layout: gate_proj / up_proj [E, I, D] and down_proj [E, D, I], each expert's slice exactly the
[out, in] weight of its Hugging Face linear. The state dict still speaks the per-expert Hugging Face keys
(`experts.{j}.gate_proj.weight`, and `.weight_scale_inv` for FP8 weights): hooks split the stacks on save and
stack the pieces on load, so checkpoints, `load_state_dict` and in-place engine updates see no change.

Compute: the (token, expert) pairs arrive sorted by expert with `offsets` (cumulative counts, int32, on the
device); each projection is one `torch._grouped_mm` over all experts, with no host synchronisation. Where
that op is missing (older torch) or cannot take the operands (CUDA with non-16-byte-aligned shapes, or a dtype
it lacks), `grouped_linear` falls back to one matmul per expert segment, which reads the counts on the host.
FP8 experts run each segment through the block-scaled FP8 GEMM (see fp8/linear.py), also per segment.

bf16 on CPU: oneDNN compiles a kernel for every new matmul shape (~1-4 ms each, then cached), and the expert
segment lengths change with every batch, so each GEMM would pay a compile. There the segments are padded with
zero rows to a few bucketed lengths (`bucket_rows`: at most 4 per doubling), which repeat from batch to batch;
zero rows change neither the outputs nor the weight gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale_inv"


def _grouped_mm_usable(x: Tensor, weight: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.is_cuda:  # CUTLASS grouped GEMM (Hopper and newer here): bf16, 16-byte aligned rows
        return (x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0
                and torch.cuda.get_device_capability(x.device) >= (9, 0))
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype inside an autocast region, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """y[r] = x[r] @ weight[e(r)]^T for rows sorted by expert.

    x [T, K] (rows of expert e are offsets[e-1]:offsets[e]); weight [E, N, K]; offsets [E] int32 cumulative
    counts ending at T -> y [T, N]. Differentiable in x and weight.
    """
    dtype = compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)  # e.g. fp32 master weights under bf16 autocast
    if _grouped_mm_usable(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return segment_linear(x, weight, offsets)


def segment_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """The fallback of grouped_linear: one matmul per expert segment (reads the counts on the host)."""
    bounds = [0] + offsets.tolist()
    parts = [x[a:b] @ weight[e].t() for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def bucket_rows(n: Tensor, per_octave: int = 4, minimum: int = 16) -> Tensor:
    """The smallest bucketed length >= n, elementwise: 0 stays 0, 1..minimum -> minimum, above that a multiple
    of 2^(floor(log2 n) - log2 per_octave) (per_octave a power of two), so at most `per_octave` lengths per
    doubling (< 1/per_octave padding above `minimum`). e.g. per_octave 4: 17 -> 20, 33 -> 40, 100 -> 112,
    2500 -> 2560."""
    n = n.to(torch.int64)
    shift = (torch.log2(n.clamp(min=1).double()).floor().to(torch.int64) - per_octave.bit_length() + 1).clamp(min=0)
    step = torch.ones_like(n) << shift
    padded = (n + step - 1) // step * step
    return torch.where(n > 0, padded.clamp(min=minimum), n)


def padded_segments(offsets: Tensor) -> tuple[Tensor, Tensor, int]:
    """Where rows sorted by expert go when each segment is padded to bucket_rows(count).
    offsets [E] int32 cumulative counts ending at T -> (row positions [T] in the padded layout, padded
    offsets [E] int32, padded total). Reads the total on the host (meant for the CPU)."""
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = bucket_rows(counts)
    padded_ends = torch.cumsum(padded, 0)
    rows = torch.arange(int(ends[-1]), device=offsets.device)
    shift = (padded_ends - padded) - (ends - counts)  # padded start - real start, per expert
    return rows + shift[torch.searchsorted(ends, rows, right=True)], padded_ends.to(torch.int32), int(padded_ends[-1])


def fp8_segment_linear(x: Tensor, weight: Tensor, scale: Tensor | None, offsets: Tensor, backend: str = "auto"
                       ) -> Tensor:
    """grouped_linear through FP8Linear's block-scaled GEMMs, one per expert segment.

    weight: fp32/bf16 masters [E, N, K] (quantized per expert in 128x128 blocks on the fly) or float8_e4m3fn
    with `scale` [E, ceil(N/128), ceil(K/128)] dequantization multipliers.
    """
    from .fp8 import fp8_linear

    bounds = [0] + offsets.tolist()
    parts = [fp8_linear(x[a:b], weight[e], None if scale is None else scale[e], backend=backend)
             for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts down(silu(gate(x)) * up(x)) with stacked weights; see the module docstring."""

    def __init__(self, num_experts: int, dim: int, hidden: int, fp8: bool = False):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.fp8 = num_experts, dim, hidden, fp8
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        for name in PROJECTIONS:  # set only while FP8 weights are held (official FP8 checkpoints)
            self.register_buffer(name + SCALE_SUFFIX, None)
        self._register_state_dict_hook(_split_experts)
        self._register_load_state_dict_pre_hook(_stack_experts, with_module=True)

    def __len__(self) -> int:
        return self.num_experts

    def expert_weight_shape(self, proj: str) -> tuple[int, int]:
        return (self.dim, self.hidden) if proj == "down_proj" else (self.hidden, self.dim)

    @property
    def holds_fp8_weight(self) -> bool:
        from .fp8 import FP8_DTYPE

        return self.gate_proj.dtype == FP8_DTYPE

    def forward(self, xs: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
        """xs [T, D] sorted by expert, offsets [E] int32 cumulative counts -> [T, D]; scale [T] (each row's gate
        weight) multiplies a row before the down projection, where it is narrower than the output."""
        fp8 = self.fp8 or self.holds_fp8_weight
        if not fp8 and xs.device.type == "cpu" and compute_dtype(xs) == torch.bfloat16:  # repeat shapes (docstring)
            where, padded_offsets, total = padded_segments(offsets)
            padded = xs.new_zeros(total, xs.shape[1]).index_copy(0, where, xs)
            if scale is not None:
                scale = scale.new_zeros(total).index_copy(0, where, scale)
            return self._swiglu(padded, padded_offsets, fp8, scale).index_select(0, where)
        return self._swiglu(xs, offsets, fp8, scale)

    def _swiglu(self, xs: Tensor, offsets: Tensor, fp8: bool, scale: Tensor | None = None) -> Tensor:
        def proj(x: Tensor, name: str) -> Tensor:
            if fp8:
                return fp8_segment_linear(x, getattr(self, name), getattr(self, name + SCALE_SUFFIX), offsets)
            return grouped_linear(x, getattr(self, name), offsets)

        hidden = F.silu(proj(xs, "gate_proj")) * proj(xs, "up_proj")
        if scale is not None:
            hidden = hidden * scale[:, None].to(hidden.dtype)
        return proj(hidden, "down_proj")

    # ---- FP8 weights (inference from official FP8 checkpoints)
    def load_fp8_weight(self, proj: str, expert: int, weight: Tensor, weight_scale_inv: Tensor) -> None:
        """Hold expert `expert`'s `proj` as float8_e4m3fn with its 128x128 block scales (all experts of a
        projection switch to FP8 storage on the first call)."""
        from .fp8 import FP8_DTYPE

        shape = self.expert_weight_shape(proj)
        blocks = tuple(-(-n // 128) for n in shape)
        if weight.dtype != FP8_DTYPE or tuple(weight.shape) != shape:
            raise ValueError(f"expert {proj}: expected float8_e4m3fn {shape}, got {weight.dtype} {tuple(weight.shape)}")
        if tuple(weight_scale_inv.shape) != blocks:
            raise ValueError(f"expert {proj}: expected weight_scale_inv {blocks}, got {tuple(weight_scale_inv.shape)}")
        stacked = getattr(self, proj)
        if stacked.dtype != FP8_DTYPE or stacked.is_meta:
            setattr(self, proj, nn.Parameter(torch.zeros(self.num_experts, *shape, dtype=FP8_DTYPE,
                                                         device=weight.device), requires_grad=False))
            setattr(self, proj + SCALE_SUFFIX, torch.ones(self.num_experts, *blocks, device=weight.device))
        getattr(self, proj).data[expert].copy_(weight)
        getattr(self, proj + SCALE_SUFFIX)[expert].copy_(weight_scale_inv.float())

    def quantize_weight_(self) -> None:
        """Replace the master weights by FP8 128x128 blocks per expert (inference only)."""
        from .fp8 import gemm

        if self.holds_fp8_weight:
            return
        for proj in PROJECTIONS:
            master = getattr(self, proj).detach()
            quantized = [gemm.weight_quant(master[e]) for e in range(self.num_experts)]
            for e, (q, s) in enumerate(quantized):
                self.load_fp8_weight(proj, e, q, s)

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) must not cast FP8 weights and their fp32 scales (as FP8Linear)."""
        if not self.holds_fp8_weight:
            return super()._apply(fn, recurse)
        held = {n: getattr(self, n).detach() for n in PROJECTIONS}
        scales = {n: getattr(self, n + SCALE_SUFFIX) for n in PROJECTIONS}
        super()._apply(fn, recurse)
        device = self.gate_proj.device
        for n in PROJECTIONS:
            setattr(self, n, nn.Parameter(held[n].to(device), requires_grad=False))
            setattr(self, n + SCALE_SUFFIX, scales[n].to(device))
        return self

    def extra_repr(self) -> str:
        mode = ", fp8 weights" if self.holds_fp8_weight else (", fp8 compute" if self.fp8 else "")
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}{mode}"


def expert_key(prefix: str, expert: int, proj: str, attr: str = "weight") -> str:
    """The Hugging Face key of one expert's tensor, e.g. model.layers.3.mlp.experts.7.up_proj.weight."""
    return f"{prefix}{expert}.{proj}.{attr}"


def _split_experts(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: stacked `{prefix}gate_proj` -> per-expert `{prefix}{j}.gate_proj.weight` views."""
    for proj in PROJECTIONS:
        for name, attr in ((proj, "weight"), (proj + SCALE_SUFFIX, "weight" + SCALE_SUFFIX)):
            stacked = state_dict.pop(prefix + name, None)
            if stacked is None:
                continue
            for j in range(module.num_experts):
                state_dict[expert_key(prefix, j, proj, attr)] = stacked[j]


def _stack_experts(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: per-expert keys -> the stacked tensors (missing experts stay reported)."""
    for proj in PROJECTIONS:
        for name, attr in ((proj, "weight"), (proj + SCALE_SUFFIX, "weight" + SCALE_SUFFIX)):
            keys = [expert_key(prefix, j, proj, attr) for j in range(module.num_experts)]
            present = [k for k in keys if k in state_dict]
            if not present:
                continue
            if len(present) < len(keys):
                missing_keys.extend(k for k in keys if k not in state_dict)
                for k in present:
                    state_dict.pop(k)
                continue
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


__all__ = ["GroupedExperts", "grouped_linear", "segment_linear", "fp8_segment_linear", "expert_key", "bucket_rows",
           "padded_segments"]
