"""Expert parallelism: a MoE layer's routed experts split over `size` ranks, tokens sent to them and back.

Rank r holds experts [r * E/size, (r+1) * E/size) (contiguous, as `torch.chunk` cuts the stacked [E, ...]
weights). Every rank routes its own tokens over all E experts (the gate and its balancing bias are whole on
every rank), then:

1. dispatch: each (token, expert) pair, sorted by expert, goes to the expert's rank by one all-to-all of the
   rows and one of their gate weights (the per-expert counts travel first, so each rank knows what arrives);
2. the rank runs its local experts on what arrived, re-ordered expert-major, as grouped GEMMs
   (GroupedExperts, unchanged);
3. combine: the outputs go back by the reverse all-to-all and are summed into their tokens.

The all-to-alls are differentiable (the backward of each is the reverse all-to-all), so an expert's weight
gradient on its rank sums every rank's tokens routed to it. The split sizes are read on the host (one
synchronisation per layer), as every EP dispatch does. Works with gloo on CPU and NCCL on GPU; the ranks may
hold different tokens (the trainer's data-parallel rows) or the same (an engine spanning several processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from .experts import PROJECTIONS, SCALE_SUFFIX, GroupedExperts, expert_key


@dataclass(frozen=True)
class ExpertShard:
    """Where a MoE layer's routed experts live: `size` ranks of `group`, this one `rank` among them."""

    group: dist.ProcessGroup
    size: int
    rank: int

    def local_range(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the experts this rank holds."""
        if num_experts % self.size:
            raise ValueError(f"{num_experts} routed experts do not split over ep_size={self.size}")
        per = num_experts // self.size
        return self.rank * per, (self.rank + 1) * per


def check_ep_size(ep_size: int, num_experts: int, workers: int, key: str = "ep_size") -> None:
    """A ValueError with the numbers unless ep_size >= 1 divides both the routed experts and the workers."""
    if ep_size < 1:
        raise ValueError(f"{key} must be >= 1, got {ep_size}")
    if ep_size > workers or workers % ep_size:
        raise ValueError(f"{key}={ep_size}: the {workers} workers must be a multiple of it (each expert-parallel "
                         f"group is {ep_size} workers)")
    if num_experts % ep_size:
        raise ValueError(f"{key}={ep_size} does not divide the model's {num_experts} routed experts per layer")


def expert_major(counts: Tensor) -> Tensor:
    """Rows that arrived source-major (counts [S, E_local]: rows from source s for local expert e, in blocks
    s = 0..S-1, e = 0..E_local-1) -> the permutation [T] that orders them expert-major (e, then s), keeping
    each block's order."""
    S, E = counts.shape
    block = torch.arange(S * E, device=counts.device).repeat_interleave(counts.flatten())
    source, expert = block // E, block % E
    return torch.sort(expert * S + source, stable=True).indices


def dispatch_combine(x: Tensor, weights: Tensor, indices: Tensor, num_experts: int, shard: ExpertShard,
                     run_experts: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Routed experts' output for this rank's tokens with the experts spread over `shard`'s ranks.

    x [N, D]; weights, indices [N, k] (gate weights and expert ids over all `num_experts`); run_experts(rows
    [T, D] sorted by local expert, offsets [E_local] int32 cumulative counts, gate weight [T]) -> [T, D] runs
    this rank's experts. Returns [N, D]. Every rank of the group must call it (a collective)."""
    N, k = indices.shape
    S = shard.size
    local = num_experts // S
    flat = indices.flatten()
    _, order = flat.sort(stable=True)
    token_of = order // k
    counts = torch.bincount(flat, minlength=num_experts).view(S, local)  # what this rank sends to each rank
    arrived = all_to_all_single(counts.flatten(), None, None, shard.group).wait().view(S, local)
    send, receive = counts.sum(1).tolist(), arrived.sum(1).tolist()
    rows = all_to_all_single_autograd(x.index_select(0, token_of), receive, send, shard.group)
    gates = all_to_all_single_autograd(weights.flatten()[order], receive, send, shard.group)
    perm = expert_major(arrived)
    offsets = torch.cumsum(arrived.sum(0), 0).to(torch.int32)
    ys = run_experts(rows.index_select(0, perm), offsets, gates.index_select(0, perm))
    back = torch.empty_like(ys).index_copy(0, perm, ys)  # source-major again
    out = all_to_all_single_autograd(back, send, receive, shard.group)
    return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))


def hold_local_experts(model: nn.Module, shard: ExpertShard) -> nn.Module:
    """Keep, in every MoE layer of `model` (in place), only the routed experts `shard`'s rank holds, as plain
    tensors, and route through `shard`: one process of an expert-parallel engine (inference). Every other
    weight stays whole. The state dict then holds this rank's experts under their global Hugging Face keys."""
    for module in model.modules():
        if hasattr(module, "expert_shard") and isinstance(getattr(module, "experts", None), GroupedExperts):  # a MoE
            module.experts.hold_slice(*shard.local_range(module.experts.num_experts))
            module.expert_shard = shard
    return model


def experts_held_elsewhere(model: nn.Module) -> frozenset[str]:
    """The Hugging Face keys (weights and their FP8 `weight_scale_inv`) of the routed experts that `model`'s MoE
    layers route to but other expert-parallel ranks hold (hold_local_experts); empty for a whole model. A whole
    checkpoint or a weight sync names them; this rank skips them."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            held = module.held_experts
            keys += [expert_key(f"{name}.", j, proj, attr) for j in range(module.num_experts) if j not in held
                     for proj in PROJECTIONS for attr in ("weight", "weight" + SCALE_SUFFIX)]
    return frozenset(keys)


__all__ = ["ExpertShard", "check_ep_size", "dispatch_combine", "expert_major", "experts_held_elsewhere",
           "hold_local_experts"]
