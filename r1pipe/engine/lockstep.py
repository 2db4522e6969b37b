"""One engine spanning several processes (expert parallelism, r1pipe.model.expert_parallel): every process holds
all weights but its share of the routed experts, takes the same requests with the same seeds, and runs the same
scheduler and sampler, so each forward is the same collective on every process (the MoE layers' all-to-alls).

What keeps them on one schedule is that they append the same tokens: `Lockstep.agree` hands every process the
tokens of the group's rank 0, one small broadcast per engine step. The processes' logits may differ in their
last bits (an index_add's order of atomic adds on CUDA, the same rows computed at other places of a grouped
GEMM), and a token drawn differently would send one process down another schedule, where the collectives no
longer pair up. Rank 0's results are the engine's; the others' outputs are not used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from r1pipe.model.expert_parallel import ExpertShard


class Lockstep:
    """The processes of one engine (`shard`'s group) appending rank 0's tokens; None: one process."""

    def __init__(self, shard: ExpertShard | None = None) -> None:
        self.shard = shard

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tokens` (any integer tensor, the same shape on every process) on every process."""
        if self.shard is None:
            return tokens
        tokens = tokens.contiguous()
        dist.broadcast(tokens, group=self.shard.group, group_src=0)
        return tokens
