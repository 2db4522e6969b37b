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

from r1pipe.errors import ConfigError
from r1pipe.model.expert_parallel import ExpertShard


def engine_shard(ep_size: int) -> ExpertShard | None:
    """This process's place in an engine of `ep_size` processes: the default torch.distributed group, which must
    have exactly ep_size ranks (r1pipe.workers.generation.GenerationGroup forms it); None for ep_size 1."""
    if ep_size < 1:
        raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != ep_size:
        raise ConfigError(f"ep_size={ep_size}: an expert-parallel engine is one of ep_size processes that form the "
                          f"default torch.distributed group (init_process_group); this process's group has {world}")
    return ExpertShard(dist.group.WORLD, ep_size, dist.get_rank())


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
