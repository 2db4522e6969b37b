"""Weight sync from the trainer to the rollout engines over torch.distributed, in buckets.

Policy rank 0 (rank 0 here) and every rollout worker (ranks 1..R) form their own process group,
made from a TCPStore hosted by the trainer (gloo on CPU, NCCL on GPU), independent of the policy
workers' FSDP group. Each step the trainer broadcasts the weights as flat buffers of at most
`bucket_bytes` (one dtype per bucket); the engines unpack each bucket into views and copy them in
place. Only the tensor names, shapes and dtypes travel through Ray, once, as plain Python.

On one machine's CPUs (`rl.shared_memory`, on) the buckets live in shared memory instead
(r1pipe.workers.shared_memory.SharedBuckets): the trainer writes them in place and the engines copy
from them, so the group carries a one-element ready signal rather than the weights, as colocated GPU
engines take weights through CUDA IPC handles.

After a sync the stage compares a fixed probe's log-probs from the engine with the trainer's
(`check_probe`) and stops the run when they disagree: a sync that silently shipped wrong weights
would otherwise train on samples from a policy nobody trains.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from r1pipe.workers.shared_memory import SharedBuckets


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch."

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def tensor_meta(name: str, t: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive tensors of one dtype grouped while a bucket stays <= bucket_bytes (a tensor larger
    than that is a bucket of its own); order preserved."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for m in metas:
        nbytes = m.numel * m.torch_dtype.itemsize
        if not buckets or buckets[-1][0].dtype != m.dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(m)
        size += nbytes
    return buckets


def pack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat buffer of the tensors (one dtype), in order (written into `out` when given)."""
    return torch.cat([t.reshape(-1) for t in tensors], out=out)


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
    """Name -> view of `flat` shaped as its meta."""
    out, offset = {}, 0
    for m in metas:
        out[m.name] = flat[offset : offset + m.numel].view(m.shape)
        offset += m.numel
    return out


class SyncGroup:
    """This process's membership of the trainer -> engines group (rank 0 sends)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: str = "cpu", timeout_s: float = 600.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.shared: SharedBuckets | None = None  # set when every member maps the same shared buckets
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        if self.device.type == "cuda":  # pragma: no cover - needs GPUs
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, buffer: torch.Tensor) -> None:
        self.group.broadcast(buffer, 0).wait()

    def send(self, named: Iterable[tuple[str, torch.Tensor]], buckets: list[list[TensorMeta]]) -> None:
        """Rank 0: broadcast `named` (in bucket order) bucket by bucket; with shared buckets, write them and
        broadcast the ready signal."""
        it = iter(named)
        for i, bucket in enumerate(buckets):
            tensors = []
            for m in bucket:
                name, t = next(it)
                if name != m.name:
                    raise RuntimeError(f"weight sync: sending {name} where the plan has {m.name}")
                tensors.append(t.to(self.device))
            if self.shared is None:
                self.broadcast(pack(tensors))
            else:
                pack(tensors, out=self.shared.tensors[i])
        if self.shared is not None:
            self.broadcast(torch.ones(1))

    def receive(self, buckets: list[list[TensorMeta]]) -> Iterator[dict[str, torch.Tensor]]:
        """Ranks 1..R: each bucket as name -> tensor (views of one received buffer, or of the shared bucket
        once the sender's signal has come)."""
        if self.shared is not None:
            self.broadcast(torch.zeros(1))
            for bucket, flat in zip(buckets, self.shared.tensors):
                yield unpack(flat, bucket)
            return
        for bucket in buckets:
            flat = torch.empty(sum(m.numel for m in bucket), dtype=bucket[0].torch_dtype, device=self.device)
            self.broadcast(flat)
            yield unpack(flat, bucket)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SyncMismatch(RuntimeError):
    """The engines' log-probs after a sync disagree with the trainer's."""


def check_probe(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, tol: float) -> float:
    """Mean |trainer - engine| log-prob over the probe's completion tokens (mask > 0), all [B, S-1];
    raises SyncMismatch above `tol`."""
    on = mask > 0
    diff = float((trainer_logp - engine_logp).abs()[on].mean()) if on.any() else 0.0
    if not diff <= tol:  # also catches NaN
        raise SyncMismatch(
            f"weight sync check failed: the engine's log-probs of the probe differ from the trainer's by "
            f"{diff:.4g} per token on average (tolerance rl.sync_check_tol={tol:g}); the rollout engines do not "
            "hold the trained weights")
    return diff
