"""Routed experts held stacked ([E, ...] parameters) and run as grouped GEMMs.

Memory layout: gate_proj / up_proj [E, I, D] and down_proj [E, D, I], each expert's slice exactly the
[out, in] weight of its Hugging Face linear. The state dict still speaks the per-expert Hugging Face keys
(`experts.{j}.gate_proj.weight`, and `.weight_scale_inv` for FP8 weights): hooks split the stacks on save and
stack the pieces on load, so checkpoints, `load_state_dict` and in-place engine updates see no change.

Compute: the (token, expert) pairs arrive sorted by expert with `offsets` (cumulative counts, int32, on the
device); no path of the forward reads the counts on the host, so a decode step can be captured in a CUDA
graph or compiled whole. Each projection is one `torch._grouped_mm` over all experts where that op takes the
operands (bf16 on Hopper-class CUDA, fp32/bf16 on CPU; not under torch.compile in fp32, whose shape rules
for the op know bf16 only). Elsewhere (fp32 on CUDA, compiled fp32) `padded_grouped_linear` runs it: each
expert's rows padded to a multiple of GROUP_TILE rows, so every tile of rows belongs to one expert, and one
batched matmul over the tiles; the number of tiles, ceil(T / GROUP_TILE) + E, depends on shapes only.
FP8 experts at inference (no gradient wanted) take the same padded layout through the block-scaled FP8
reference GEMM (`fp8_grouped_linear`); FP8 training still runs each expert segment through FP8Linear's
differentiable GEMMs (`fp8_segment_linear`), which reads the counts on the host.

bf16 on CPU: oneDNN compiles a kernel for every new matmul shape (~1-4 ms each, then cached), and the expert
segment lengths change with every batch, so each GEMM would pay a compile. There the segments are padded with
zero rows to a few bucketed lengths (`bucket_rows`: at most 4 per doubling), which repeat from batch to batch;
zero rows change neither the outputs nor the weight gradients. That padding reads the padded total on the
host, so it is skipped under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale_inv"
GROUP_TILE = 16  # rows per tile of the padded grouped path (every tile belongs to one expert)


def _grouped_mm_usable(x: Tensor, weight: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # the op's shape rules accept bf16 only
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
    return padded_grouped_linear(x, weight, offsets)


def tile_layout(offsets: Tensor, rows: int, tile: int = GROUP_TILE) -> tuple[Tensor, Tensor, int]:
    """Rows sorted by expert laid out with each expert's segment padded to a multiple of `tile` rows, computed
    on the device. offsets [E] int32 cumulative counts ending at `rows` -> (each row's position [rows] in the
    padded layout, each tile's expert [n_tiles], n_tiles). n_tiles = ceil(rows / tile) + E bounds the padded
    segments (sum_e ceil(c_e / tile) <= ceil(rows / tile) + E) and depends on shapes only; tiles past the last
    segment hold zero rows and name the last expert."""
    E = offsets.shape[0]
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + tile - 1) // tile * tile
    padded_ends = torch.cumsum(padded, 0)
    index = torch.arange(rows, device=offsets.device)
    shift = (padded_ends - padded) - (ends - counts)  # padded start - real start, per expert
    where = index + shift[torch.searchsorted(ends, index, right=True).clamp_(max=E - 1)]
    n_tiles = -(-rows // tile) + E
    starts = torch.arange(n_tiles, device=offsets.device) * tile
    tile_expert = torch.searchsorted(padded_ends, starts, right=True).clamp_(max=E - 1)
    return where, tile_expert, n_tiles


def padded_grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, tile: int = GROUP_TILE) -> Tensor:
    """grouped_linear without torch._grouped_mm and without a host synchronisation: the rows in `tile_layout`,
    one bmm of every tile against its expert's weight (gathered per tile: n_tiles x N x K values), the rows
    read back. Differentiable in x and weight."""
    T, K = x.shape
    where, tile_expert, n_tiles = tile_layout(offsets, T, tile)
    padded = x.new_zeros(n_tiles * tile, K).index_copy(0, where, x)
    y = torch.bmm(padded.view(n_tiles, tile, K), weight.index_select(0, tile_expert).transpose(1, 2))
    return y.view(n_tiles * tile, -1).index_select(0, where)


def fp8_grouped_linear(x: Tensor, weight: Tensor, scale: Tensor | None, offsets: Tensor, backend: str = "auto",
                       tile: int = GROUP_TILE) -> Tensor:
    """fp8_segment_linear's result without a host synchronisation (inference: not differentiable).

    The rows are quantized in 1x128 tiles at once (a row's tiles do not depend on its segment), laid out as in
    `tile_layout` (padding rows quantize to 0 with scale 0), and every tile of rows is multiplied with its
    expert's 128x128-block FP8 weight by the block-scaled reference GEMM (fp32 accumulation per 128-chunk).
    weight as in fp8_segment_linear: masters [E, N, K] (quantized per expert here) or float8_e4m3fn with
    `scale` [E, ceil(N/128), ceil(K/128)]."""
    from .fp8 import FP8_DTYPE, gemm
    from .fp8.quant import fp8_grouped_gemm_ref

    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):  # float8 tensors take no part in autocast's casts
        if weight.dtype != FP8_DTYPE:
            quantized = [gemm.weight_quant(weight[e], backend=backend) for e in range(weight.shape[0])]
            weight, scale = torch.stack([q for q, _ in quantized]), torch.stack([s for _, s in quantized])
        T, K = x.shape
        qx, sx = gemm.act_quant(x, backend=backend)
        where, tile_expert, n_tiles = tile_layout(offsets, T, tile)
        # float8 has no index_copy kernel everywhere: move the bytes (0x00 is +0.0 in E4M3)
        qp = qx.new_zeros(n_tiles * tile, K, dtype=torch.uint8).index_copy(0, where, qx.view(torch.uint8))
        sp = sx.new_zeros(n_tiles * tile, sx.shape[1]).index_copy(0, where, sx)
        y = fp8_grouped_gemm_ref(qp.view(FP8_DTYPE).view(n_tiles, tile, K), sp.view(n_tiles, tile, -1), weight,
                                 scale, tile_expert, x.dtype)
        return y.view(n_tiles * tile, -1).index_select(0, where)


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
    """grouped_linear through FP8Linear's block-scaled GEMMs, one per expert segment (differentiable; reads the
    counts on the host: the training path).

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
        self.first_expert = 0  # global id of the first expert held here (expert parallelism holds a slice)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        for name in PROJECTIONS:  # set only while FP8 weights are held (official FP8 checkpoints)
            self.register_buffer(name + SCALE_SUFFIX, None)
        self._register_state_dict_hook(_split_experts)
        self._register_load_state_dict_pre_hook(_stack_experts, with_module=True)

    def __len__(self) -> int:
        return self.num_experts

    @property
    def held_experts(self) -> range:
        """Global ids of the experts whose weights this module holds (all, unless expert-parallel)."""
        return range(self.first_expert, self.first_expert + self.gate_proj.shape[0])  # a DTensor: all

    def hold_slice(self, start: int, end: int) -> None:
        """Keep only experts [start, end) (plain tensors; inference, e.g. one process of an expert-parallel
        engine); the state dict then speaks those experts' global Hugging Face keys."""
        for name in PROJECTIONS:
            for attr in (name, name + SCALE_SUFFIX):
                t = getattr(self, attr)
                if t is None:
                    continue
                piece = t.detach()[start - self.first_expert: end - self.first_expert].clone()
                setattr(self, attr, nn.Parameter(piece, requires_grad=t.requires_grad) if attr == name else piece)
        self.first_expert = start

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
        if (not fp8 and xs.device.type == "cpu" and compute_dtype(xs) == torch.bfloat16
                and not torch.compiler.is_compiling()):  # repeat shapes (docstring)
            where, padded_offsets, total = padded_segments(offsets)
            padded = xs.new_zeros(total, xs.shape[1]).index_copy(0, where, xs)
            if scale is not None:
                scale = scale.new_zeros(total).index_copy(0, where, scale)
            return self._swiglu(padded, padded_offsets, fp8, scale).index_select(0, where)
        return self._swiglu(xs, offsets, fp8, scale)

    def _swiglu(self, xs: Tensor, offsets: Tensor, fp8: bool, scale: Tensor | None = None) -> Tensor:
        def proj(x: Tensor, name: str) -> Tensor:
            if fp8:
                weight, weight_scale = _local(getattr(self, name)), getattr(self, name + SCALE_SUFFIX)
                if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                    return fp8_segment_linear(x, weight, weight_scale, offsets)
                return fp8_grouped_linear(x, weight, weight_scale, offsets)
            return grouped_linear(x, _local(getattr(self, name)), offsets)

        hidden = F.silu(proj(xs, "gate_proj")) * proj(xs, "up_proj")
        if scale is not None:
            hidden = hidden * scale[:, None].to(hidden.dtype)
        return proj(hidden, "down_proj")

    # ---- FP8 weights (inference from official FP8 checkpoints)
    def load_fp8_weight(self, proj: str, expert: int, weight: Tensor, weight_scale_inv: Tensor) -> None:
        """Hold expert `expert`'s (global id) `proj` as float8_e4m3fn with its 128x128 block scales (all experts of a
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
            held = len(self.held_experts)
            setattr(self, proj, nn.Parameter(torch.zeros(held, *shape, dtype=FP8_DTYPE, device=weight.device),
                                             requires_grad=False))
            setattr(self, proj + SCALE_SUFFIX, torch.ones(held, *blocks, device=weight.device))
        getattr(self, proj).data[expert - self.first_expert].copy_(weight)
        getattr(self, proj + SCALE_SUFFIX)[expert - self.first_expert].copy_(weight_scale_inv.float())

    def quantize_weight_(self) -> None:
        """Replace the master weights by FP8 128x128 blocks per expert (inference only)."""
        from .fp8 import gemm

        if self.holds_fp8_weight:
            return
        for proj in PROJECTIONS:
            master = getattr(self, proj).detach()
            quantized = [gemm.weight_quant(w) for w in master]
            for e, (q, s) in zip(self.held_experts, quantized):
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


def _local(t: Tensor) -> Tensor:
    """This rank's part of a weight that expert parallelism distributed (a DTensor), else the weight itself."""
    return t.to_local() if hasattr(t, "to_local") else t


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
            for i, j in enumerate(module.held_experts):
                state_dict[expert_key(prefix, j, proj, attr)] = stacked[i]


def _stack_experts(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: per-expert keys -> the stacked tensors of the experts held here (missing ones
    stay reported; other experts' keys, which a whole checkpoint has for an expert-parallel slice, are dropped)."""
    held = module.held_experts
    for proj in PROJECTIONS:
        for name, attr in ((proj, "weight"), (proj + SCALE_SUFFIX, "weight" + SCALE_SUFFIX)):
            for j in range(module.num_experts):
                if j not in held:
                    state_dict.pop(expert_key(prefix, j, proj, attr), None)
            keys = [expert_key(prefix, j, proj, attr) for j in held]
            present = [k for k in keys if k in state_dict]
            if not present:
                continue
            if len(present) < len(keys):
                missing_keys.extend(k for k in keys if k not in state_dict)
                for k in present:
                    state_dict.pop(k)
                continue
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


__all__ = ["GroupedExperts", "grouped_linear", "padded_grouped_linear", "tile_layout", "fp8_grouped_linear",
           "fp8_segment_linear", "expert_key", "bucket_rows",
           "padded_segments"]
