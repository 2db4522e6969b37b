"""DeepSeekMoE: shared experts + fine-grained routed experts with sigmoid, group-limited top-k routing and
auxiliary-loss-free balancing (a per-expert bias that steers selection only, nudged from observed load)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .expert_parallel import ExpertShard, dispatch_combine
from .experts import GroupedExperts
from .linear import make_linear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, fp8: bool = False):
        super().__init__()
        self.gate_proj = make_linear(dim, hidden, fp8=fp8)
        self.up_proj = make_linear(dim, hidden, fp8=fp8)
        self.down_proj = make_linear(hidden, dim, fp8=fp8)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def select_experts(scores: Tensor, bias: Tensor, n_group: int, topk_group: int, top_k: int) -> Tensor:
    """Group-limited top-k on biased affinities: keep the topk_group groups with the highest sum of their top-2
    biased scores, then the top_k experts inside them. scores [N,E] -> expert ids [N,top_k]."""
    biased = scores + bias
    N, E = biased.shape
    if n_group > 1:
        grouped = biased.view(N, n_group, E // n_group)
        group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)
    return biased.topk(top_k, dim=-1).indices


def gate_weights(scores: Tensor, indices: Tensor, norm_topk_prob: bool, scaling: float) -> Tensor:
    """Gate weights of the chosen experts from the unbiased affinities (the bias never enters here)."""
    w = scores.gather(-1, indices)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # selection-only bias, kept in fp32 (it moves in steps of gamma ~ 1e-3)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: Tensor, routing: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [N,D] -> (gate weights [N,k] fp32, expert ids [N,k], affinities [N,E] fp32)."""
        c = self.config
        with torch.autocast(x.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        if routing is None:
            with torch.no_grad():
                indices = select_experts(scores, self.e_score_correction_bias.float(), c.n_group, c.topk_group,
                                         c.num_experts_per_tok)
        else:
            indices = routing.to(scores.device, torch.long)
        return gate_weights(scores, indices, c.norm_topk_prob, c.routed_scaling_factor), indices, scores


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        c = config
        self.config = c
        self.gate = Gate(c)
        self.experts = GroupedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                                      fp8=c.fp8_for(f"{prefix}.experts"))
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts,
                                   fp8=c.fp8_for(f"{prefix}.shared_experts")) if c.n_shared_experts else None)
        self.expert_shard: ExpertShard | None = None  # set by expert parallelism (r1pipe.model.expert_parallel)
        # tokens routed to each expert by training forwards since the last bias update
        self.register_buffer("expert_load", torch.zeros(c.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor, routing: Tensor | None = None, token_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B,S,D] -> (output [B,S,D], expert ids [B,S,k], sequence-wise balance loss (unscaled by alpha))."""
        B, S, D = x.shape
        c = self.config
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat, None if routing is None else routing.reshape(B * S, -1))
        out = self.routed(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        real = None if token_mask is None else token_mask.reshape(-1)
        if self.training:
            with torch.no_grad():  # a scatter-add, not bincount/boolean indexing: no host synchronisation
                counted = indices.new_ones(indices.shape, dtype=torch.float32)
                if real is not None:
                    counted = counted * real[:, None].float()
                self.expert_load.index_add_(0, indices.flatten(), counted.flatten())
        balance = x.new_zeros((), dtype=torch.float32)
        if c.seq_aux_alpha > 0:
            balance = sequence_balance_loss(scores.view(B, S, -1), indices.view(B, S, -1),
                                            None if token_mask is None else token_mask.view(B, S))
        return out.view(B, S, D), indices.view(B, S, -1), balance

    def routed(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Sort the (token, expert) pairs by expert once, run every expert's projections as grouped GEMMs on the
        sorted rows (each weighted by its gate before the down projection) and scatter back. x [N,D],
        weights/indices [N,k] -> [N,D]. No host synchronisation: the segment offsets stay on the device. With an
        expert shard the pairs travel to the experts' ranks and back (expert_parallel.dispatch_combine)."""
        if self.expert_shard is not None:
            return dispatch_combine(x, weights, indices, self.config.n_routed_experts, self.expert_shard, self.experts)
        N, k = indices.shape
        flat_expert = indices.flatten()
        sorted_expert, order = flat_expert.sort(stable=True)
        experts = torch.arange(self.config.n_routed_experts, device=x.device, dtype=sorted_expert.dtype)
        offsets = torch.searchsorted(sorted_expert, experts, right=True).to(torch.int32)  # [E] cumulative counts
        token_of = order // k
        # each row's gate weight enters before the down projection (the hidden is narrower than the output)
        ys = self.experts(x.index_select(0, token_of), offsets, weights.flatten()[order])
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))  # backward: a fixed summation order

    @torch.no_grad()
    def update_bias(self, gamma: float) -> float:
        """Aux-loss-free balancing step: overloaded experts' bias -= gamma, underloaded += gamma. Returns MaxVio
        (max load / mean load - 1) of the load accumulated since the last call, then clears it."""
        load = self.expert_load
        if load.sum() == 0:
            return 0.0
        mean = load.mean()
        max_vio = float(load.max() / mean - 1)
        self.gate.e_score_correction_bias += gamma * torch.sign(mean - load)
        load.zero_()
        return max_vio


def sequence_balance_loss(scores: Tensor, indices: Tensor, token_mask: Tensor | None) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.
    f_i = E/(k*T) * (tokens of the sequence routed to i); P_i = mean over tokens of normalised affinity s_i."""
    B, S, E = scores.shape
    k = indices.shape[-1]
    m = torch.ones(B, S, device=scores.device) if token_mask is None else token_mask.float()
    T = m.sum(1).clamp(min=1)  # [B]
    chosen = torch.zeros(B, S, E, device=scores.device).scatter_(-1, indices, 1.0) * m[..., None]
    f = chosen.sum(1) * E / (k * T[:, None])
    p = ((scores / scores.sum(-1, keepdim=True)) * m[..., None]).sum(1) / T[:, None]
    return (f * p).sum(-1).mean()
