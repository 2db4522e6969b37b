"""PolicyGroup: N data-parallel PolicyWorker actors driven as one.

It creates the actors in their bundles of the stage's placement group (r1pipe.workers.placement),
joins them into one torch.distributed group (FSDP2-sharded unless fsdp=False), and splits every
batch by rows across them (contiguous shards of near-equal token counts; a rank may get none), telling every rank how many
micro-batches to run so the sharded collectives line up. `sync_weights` sends the weights to the
rollout engines over their own process group (r1pipe.workers.weight_sync).
"""
from __future__ import annotations

from typing import Any

import ray
import torch

from r1pipe.algo.sft import TargetCounts
from r1pipe.data.batch import TrainBatch
from r1pipe.workers.placement import Placement
from r1pipe.workers.policy import PolicyConfig, PolicyWorker
from r1pipe.workers.weight_sync import plan_buckets


def balanced_shards(tokens: torch.Tensor, parts: int) -> list[slice]:
    """`parts` contiguous row ranges whose token counts (tokens [B], per row) are as equal as whole rows allow:
    each cut falls where the running total is nearest its share, so no rank waits long for a longer one."""
    n = len(tokens)
    cum = tokens.double().cumsum(0)
    total = float(cum[-1]) if n else 0.0
    if total <= 0:
        bounds = [round(i * n / parts) for i in range(parts + 1)]
    else:
        bounds = [0]
        for j in range(1, parts):
            target = total * j / parts
            r = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)))  # first row reaching it
            cut = r + 1 if r < n and (r == 0 or abs(float(cum[r]) - target) <= abs(float(cum[r - 1]) - target)) else r
            bounds.append(min(max(cut, bounds[-1]), n))
        bounds.append(n)
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def _combine(results: list[dict[str, float]]) -> dict[str, float]:
    """The ranks' step results as one: sums added, *_max keys maxed, grad_norm and maxvio (the same on every
    rank) from rank 0."""
    total: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            total[k] = max(total.get(k, 0.0), v) if k.endswith("_max") else total.get(k, 0.0) + v
    total["grad_norm"] = results[0]["grad_norm"]
    total["maxvio"] = results[0]["maxvio"]
    return total


class PolicyGroup:
    def __init__(
        self,
        num_workers: int,
        model_path: str,
        cfg: PolicyConfig,
        frozen_path: str | None = None,
        placement: Placement | None = None,
    ):
        """`frozen_path`: a model each worker holds without gradients (the KL reference, a teacher; see
        PolicyWorker); `placement`: the stage's reserved placement group; None: Ray's default (1 CPU each)."""
        actor = ray.remote(PolicyWorker)
        self.cfg = cfg
        self.workers = [actor.options(**(placement.options("policy", rank) if placement else {})).remote(
                            rank, num_workers, model_path, cfg, frozen_path) for rank in range(num_workers)]
        self.buckets: list | None = None
        if num_workers > 1:
            address = ray.get(self.workers[0].rendezvous_address.remote())
            ray.get([w.init_distributed.remote(address) for w in self.workers])
        self.mtp_depth = ray.get(self.workers[0].mtp_depth.remote())  # MTP modules the supervised loss trains

    def _num_micro(self, shards: list[slice]) -> int:
        """Micro-batches every rank runs: enough for the largest shard."""
        largest = max(s.stop - s.start for s in shards)
        return max(1, -(-largest // self.cfg.micro_batch_size))

    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        shards = balanced_shards(batch.attention_mask.sum(1), len(self.workers))
        num_micro = self._num_micro(shards)
        refs = [w.logprobs.remote(batch.rows(s), reference, num_micro) for w, s in zip(self.workers, shards)]
        return torch.cat(ray.get(refs))

    def train_step(
        self,
        batch: TrainBatch,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        ref_logp: torch.Tensor | None,
        num_tokens: float,
        num_seqs: float,
        tis_weight: torch.Tensor | None = None,
        num_draft_positions: float = 0.0,
        engine_logp: torch.Tensor | None = None,
        tis_cap: float | None = None,
        lr: float | None = None,
    ) -> dict[str, float]:
        """One synchronous optimizer step of every rank (see PolicyWorker.train_step; old_logp None: the
        step's own forward gives them); sums are added over ranks, *_max keys maxed, grad_norm / maxvio
        (identical on every rank) taken from rank 0."""
        shards = balanced_shards(batch.attention_mask.sum(1), len(self.workers))
        num_micro = self._num_micro(shards)
        refs = [
            w.train_step.remote(
                batch.rows(s), None if old_logp is None else old_logp[s], advantages[s],
                None if ref_logp is None else ref_logp[s], num_tokens, num_seqs,
                None if tis_weight is None else tis_weight[s], num_draft_positions, num_micro,
                None if engine_logp is None else engine_logp[s], tis_cap, lr,
            )
            for w, s in zip(self.workers, shards)
        ]
        return _combine(ray.get(refs))

    def supervised_step(self, batch: TrainBatch, lr: float | None = None) -> dict[str, float]:
        """One optimizer step of the supervised loss on `batch` (PolicyWorker.supervised_step), normalised by
        its whole target counts; the ranks' sums added (grad_norm, maxvio from rank 0)."""
        counts = TargetCounts.of(batch.target_mask, self.mtp_depth)
        shards = balanced_shards(batch.attention_mask.sum(1), len(self.workers))
        num_micro = self._num_micro(shards)
        return _combine(ray.get([w.supervised_step.remote(batch.rows(s), counts, num_micro, lr)
                                 for w, s in zip(self.workers, shards)]))

    def eval_loss(self, batch: TrainBatch) -> float:
        """Mean next-token CE over the targets of `batch` (a validation loss)."""
        shards = balanced_shards(batch.attention_mask.sum(1), len(self.workers))
        num_micro = self._num_micro(shards)
        parts = ray.get([w.eval_loss.remote(batch.rows(s), num_micro) for w, s in zip(self.workers, shards)])
        return sum(t for t, _ in parts) / max(sum(n for _, n in parts), 1.0)

    def memory(self) -> list[dict[str, int]]:
        """Per rank: bytes of parameters and optimizer state held."""
        return ray.get([w.memory.remote() for w in self.workers])

    def connect_engines(self, engines: list[Any], bucket_mb: float, shared_memory: bool = True,
                        engines_read_in_place: bool = True) -> None:
        """Form the trainer -> engines process group (policy rank 0 and every rollout actor, which must
        have `join_sync` and `receive_weights`) and plan the buckets; only names and shapes cross Ray.
        With `shared_memory`, CPU workers and engines all on rank 0's machine exchange the buckets through
        shared memory (r1pipe.workers.shared_memory.SharedBuckets); self.shared_memory says whether they do.
        The engines then read the trainer's weights in place, unless `engines_read_in_place` is False (the
        trainer trains while they generate): then each sync copies them."""
        host, port = ray.get(self.workers[0].sync_address.remote())
        world = 1 + len(engines)
        self.buckets = plan_buckets(ray.get(self.workers[0].weight_metas.remote()), int(bucket_mb * 2**20))
        ray.get([self.workers[0].join_sync.remote(host, port, world, self.buckets)]
                + [e.join_sync.remote(host, port, i + 1, world, self.buckets) for i, e in enumerate(engines)])
        self.engines = list(engines)
        self.shared_memory = False
        if shared_memory and self.cfg.device == "cpu":
            node = ray.get(self.workers[0].node_id.remote())
            if all(n == node for n in ray.get([e.node_id.remote() for e in engines])):
                directory = ray.get(self.workers[0].share_buckets.remote())
                if directory is not None:
                    try:
                        ray.get([e.attach_shared_buckets.remote(directory, engines_read_in_place) for e in engines])
                    finally:
                        ray.get(self.workers[0].unlink_shared.remote(directory))
                    self.shared_memory = True

    def sync_weights(self) -> None:
        """Send the current weights to the connected engines (over torch.distributed, or through shared memory
        on one machine; never through Ray's object store)."""
        if self.buckets is None:
            raise RuntimeError("sync_weights before connect_engines")
        ray.get([w.send_weights.remote() for w in self.workers] + [e.receive_weights.remote() for e in self.engines])

    def checkpoint_bytes(self) -> int:
        """Bytes a checkpoint of the group takes (PolicyWorker.checkpoint_bytes, summed over ranks)."""
        return sum(ray.get([w.checkpoint_bytes.remote() for w in self.workers]))

    def save_checkpoint(self, path: str, tokenizer_dir: str | None) -> None:
        ray.get([w.save_checkpoint.remote(path, tokenizer_dir) for w in self.workers])

    def load_checkpoint(self, path: str) -> None:
        ray.get([w.load_checkpoint.remote(path) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
