"""PolicyGroup: N data-parallel PolicyWorker actors driven as one.

It creates the actors with the recipe's Ray resources, joins them into one torch.distributed
group, and splits every batch by rows across them (contiguous shards; a rank may get none).
"""
from __future__ import annotations

from typing import Any

import ray
import torch

from r1pipe.workers.batch import TrainBatch
from r1pipe.workers.policy import PolicyConfig, PolicyWorker


def _shards(n: int, parts: int) -> list[slice]:
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


class PolicyGroup:
    def __init__(
        self,
        num_workers: int,
        model_path: str,
        cfg: PolicyConfig,
        with_reference: bool,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ):
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(PolicyWorker)
        self.workers = [actor.remote(rank, num_workers, model_path, cfg, with_reference) for rank in range(num_workers)]
        if num_workers > 1:
            address = ray.get(self.workers[0].rendezvous_address.remote())
            ray.get([w.init_distributed.remote(address) for w in self.workers])

    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        shards = _shards(len(batch), len(self.workers))
        refs = [w.logprobs.remote(batch.rows(s), reference) for w, s in zip(self.workers, shards)]
        return torch.cat(ray.get(refs))

    def train_step(
        self,
        batch: TrainBatch,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        ref_logp: torch.Tensor | None,
        num_tokens: float,
        num_seqs: float,
        tis_weight: torch.Tensor | None = None,
        num_draft_positions: float = 0.0,
    ) -> dict[str, float]:
        """One synchronous optimizer step of every rank; token sums are added over ranks,
        grad_norm / maxvio (identical on every rank after the all-reduce) taken from rank 0."""
        shards = _shards(len(batch), len(self.workers))
        refs = [
            w.train_step.remote(
                batch.rows(s), old_logp[s], advantages[s], None if ref_logp is None else ref_logp[s], num_tokens, num_seqs,
                None if tis_weight is None else tis_weight[s], num_draft_positions,
            )
            for w, s in zip(self.workers, shards)
        ]
        results = ray.get(refs)
        total: dict[str, float] = {}
        for r in results:
            for k, v in r.items():
                total[k] = total.get(k, 0.0) + v
        total["grad_norm"] = results[0]["grad_norm"]
        total["maxvio"] = results[0]["maxvio"]
        return total

    def state_dict_ref(self) -> Any:
        """An object ref of rank 0's weights, handed straight to rollout workers."""
        return self.workers[0].state_dict.remote()

    def save_checkpoint(self, path: str, tokenizer_dir: str | None) -> None:
        ray.get([w.save_checkpoint.remote(path, tokenizer_dir) for w in self.workers])

    def load_checkpoint(self, path: str) -> None:
        ray.get([w.load_checkpoint.remote(path) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
