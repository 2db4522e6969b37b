"""Weight sync from the trainer to the rollout engines over torch.distributed, in buckets.

Policy rank 0 (rank 0 here) and every rollout worker (ranks 1..R) form their own process group,
made from a TCPStore hosted by the trainer (gloo on CPU, NCCL on GPU), independent of the policy
workers' FSDP group. The weights travel as flat buffers of at most `bucket_bytes` (one dtype per
bucket). Only the tensor names, shapes and dtypes travel through Ray, once, as plain Python.

A whole (unsharded) model on either end keeps its weights in flat buffers laid out as the buckets
(`rehome`), so a bucket moves in one broadcast or copy, not one per tensor; a sharded trainer gathers
and packs its weights tensor by tensor. An engine that takes weights only by name through its own loader
(vLLM) receives each bucket into a buffer of its own and hands over the named views (`receive_each`).

On one machine's CPUs (`rl.sync.shared_memory`, on) the buckets live in shared memory
(r1pipe.workers.shared_memory.SharedBuckets) and the group carries a ready signal and a reply instead of
the weights. A whole trainer's weights live in the buckets, and engines of the same dtype read them in
place (as a hybrid engine shares the actor's memory on a GPU): one copy of the weights serves all. That
is sound because the GRPO loop never trains while the engines generate, and a sync returns only once
every engine has its weights; an engine that is to take weights any other way (update_weights) first
moves to a private copy. Engines of another dtype copy from the buckets.

After a sync the stage compares a fixed probe's log-probs from the engine with the trainer's
(`check_probe`) and stops the run when they disagree: a sync that silently shipped wrong weights
would otherwise train on samples from a policy nobody trains.
"""
from __future__ import annotations

import bisect
import datetime
import itertools
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from r1pipe.model.fp8 import FP8_DTYPE, set_fp8_weight, weight_dequant
from r1pipe.workers.shared_memory import SharedBuckets, node_ip


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


def offsets(metas: list[TensorMeta]) -> list[int]:
    """Where each tensor of a bucket starts in its flat buffer (elements)."""
    return list(itertools.accumulate((m.numel for m in metas[:-1]), initial=0))


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
    """Name -> view of `flat` shaped as its meta."""
    return {m.name: flat[o:o + m.numel].view(m.shape) for m, o in zip(metas, offsets(metas))}


@dataclass
class FlatWeights:
    """A model's weights moved into one flat buffer per bucket of `plan` (`rehome`). `placed`: the parameters and
    buffers that are now views of the flat buffers, with their data pointers then (checked by `fits`);
    `loose`: (bucket view, the model's tensor, its FP8 block scales or None) of the state-dict entries that are
    not, copied one by one (into an FP8 weight of an `fp8` engine: quantized on the way in);
    `num_names`: the state-dict entries a sync sets; `adopted`: the buffers hold another process's weights."""

    plan: list[list[TensorMeta]]
    flats: list[torch.Tensor]
    placed: list[tuple[torch.Tensor, int]]
    loose: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    num_names: int
    adopted: bool = False

    def fits(self, buckets: list[list[TensorMeta]]) -> bool:
        """Whether these buffers serve `buckets`: the same plan, and every placed tensor still lives where it
        was put (nothing has replaced its storage since)."""
        return self.plan == buckets and all(t.data_ptr() == ptr for t, ptr in self.placed)


@torch.no_grad()
def rehome(model: nn.Module, buckets: list[list[TensorMeta]], into: list[torch.Tensor] | None = None,
           adopt: bool = False) -> FlatWeights:
    """Move `model`'s parameters and buffers into flat buffers laid out as `buckets`: new ones, or `into` (one
    flat tensor per bucket, e.g. the shared buckets themselves). The model's values are kept, unless `adopt`:
    then `into` already holds the weights (another process's, which it writes) and nothing is written to it.

    A parameter or buffer moves when its state-dict entries (itself, or the per-expert slices of a
    stacked tensor) fill one run of one bucket in their own order, with the bucket's dtype and the
    planned shapes; it then becomes a view of that run (`.data` is re-pointed, so the object, its
    gradient and optimizer state stay). Every other entry named in the buckets (an alias of a tensor
    already placed, a dtype the bucket does not have) is loose. Names the model lacks are skipped."""
    state = model.state_dict(keep_vars=True)
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    sizes = [(sum(m.numel for m in bucket), bucket[0].torch_dtype) for bucket in buckets]
    if adopt and into is None:
        raise ValueError("rehome: adopt needs the buffers that hold the weights (into)")
    if into is not None and [(t.numel(), t.dtype) for t in into] != sizes:
        raise ValueError("rehome: the given buffers do not match the buckets' sizes and dtypes")
    flats = into if into is not None else [torch.empty(n, dtype=dtype, device=device) for n, dtype in sizes]
    where = {m.name: (i, o, m) for i, bucket in enumerate(buckets) for m, o in zip(bucket, offsets(bucket))}
    owners = _owners(model)
    starts = [start for start, _, _ in owners]
    entries: dict[int, list[str]] = {}  # owner index -> the state-dict entries inside it
    for name, t in state.items():
        if name in where and t.numel():
            k = bisect.bisect_right(starts, t.data_ptr()) - 1  # the owner whose bytes hold the entry
            if k >= 0 and t.data_ptr() < owners[k][1]:
                entries.setdefault(k, []).append(name)
    placed, done = [], set()
    for k, names in entries.items():
        owner = owners[k][2]
        run = _run(owner, sorted(names, key=lambda n: state[n].data_ptr()), state, where)
        if run is None:
            continue
        i, offset, names = run
        view = flats[i][offset:offset + owner.numel()].view(owner.shape)
        if not adopt:
            view.copy_(owner)
        owner.data = view
        placed.append((owner, owner.data_ptr()))
        done.update(names)
    loose = []
    for name, (i, offset, m) in where.items():
        if name not in done and name in state:
            t = state[name].detach()
            scale = state[name + "_scale_inv"] if t.dtype == FP8_DTYPE else None  # an FP8 engine's weight
            view = flats[i][offset:offset + m.numel].view(m.shape)
            loose.append((view, t, scale))
            if not adopt:  # the buffers hold every entry's value from the start
                view.copy_(t if scale is None else weight_dequant(t, scale, view.dtype))
    return FlatWeights(buckets, flats, placed, loose, len(done) + len(loose), adopt)


def _owners(model: nn.Module) -> list[tuple[int, int, torch.Tensor]]:
    """(first byte, end byte, tensor) of every parameter and buffer with elements, by address; tensors whose
    bytes overlap another's (a view of one) are left out, as their entries cannot move alone."""
    spans = sorted(((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), t)
                    for t in itertools.chain(model.parameters(), model.buffers()) if t.numel()), key=lambda x: x[0])
    clash = {i for i in range(1, len(spans)) if spans[i][0] < spans[i - 1][1]}
    clash |= {i - 1 for i in clash}
    return [span for i, span in enumerate(spans) if i not in clash]


def _run(owner: torch.Tensor, names: list[str], state: dict[str, torch.Tensor],
         where: dict[str, tuple[int, int, TensorMeta]]) -> tuple[int, int, list[str]] | None:
    """(bucket, offset, names) when the entries `names` (sorted by address; exact repeats, i.e. aliases,
    dropped) tile `owner` in order and lie in that order in one run of one bucket; else None."""
    if not owner.is_contiguous():
        return None
    i, start, _ = where[names[0]]
    covered, kept, size = 0, [], owner.element_size()
    for name in names:
        t = state[name]
        j, offset, meta = where[name]
        if kept and t.data_ptr() == state[kept[-1]].data_ptr() and t.numel() == state[kept[-1]].numel():
            continue  # an alias of the entry before
        if (j != i or offset != start + covered or t.data_ptr() != owner.data_ptr() + covered * size
                or not t.is_contiguous() or tuple(t.shape) != meta.shape or t.dtype != meta.torch_dtype
                or owner.dtype != meta.torch_dtype):
            return None
        covered += t.numel()
        kept.append(name)
    return (i, start, kept) if covered == owner.numel() else None


class SyncGroup:
    """This process's membership of the trainer -> engines group (rank 0 sends), and the bucket plan every sync
    follows (fixed when the group forms, so a sync's calls carry no plan)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, buckets: list[list[TensorMeta]],
                 device: str = "cpu", timeout_s: float = 600.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.buckets = buckets
        self.shared: SharedBuckets | None = None  # set when every member maps the same shared buckets
        self.scratch: dict[torch.dtype, torch.Tensor] = {}  # receive_each's buffers, one per dtype
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        if self.device.type == "cuda":  # pragma: no cover - needs GPUs
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, buffer: torch.Tensor) -> None:
        self.group.broadcast(buffer, 0).wait()

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Rank 0, a model gathered tensor by tensor (sharded): broadcast `named` (in bucket order) bucket by
        bucket; with shared buckets, write them, signal that they are ready and wait for every engine's copy."""
        it = iter(named)
        for i, bucket in enumerate(self.buckets):
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
            self.all_copied()

    def send_flat(self, weights: FlatWeights) -> None:
        """Rank 0, a rehomed model: fill in the loose entries, then each bucket goes out in one piece. With
        shared buckets (which may be the model's own buffers: nothing to copy then) it signals that they are
        ready and returns once every engine has taken its copy, so the trainer cannot change them under a
        reader."""
        for view, t, scale in weights.loose:
            view.copy_(t if scale is None else weight_dequant(t, scale, view.dtype))
        for i, flat in enumerate(weights.flats):
            if self.shared is None:
                self.broadcast(flat)
            elif flat.data_ptr() != self.shared.tensors[i].data_ptr():
                self.shared.tensors[i].copy_(flat)
        if self.shared is not None:
            self.broadcast(torch.ones(1))
            self.all_copied()

    def all_copied(self) -> None:
        """Every member has read the shared buckets (a collective all join)."""
        self.group.allreduce([torch.zeros(1)]).wait()

    def receive_flat(self, weights: FlatWeights) -> int:
        """Ranks 1..R, a rehomed model: each bucket arrives in one piece into the model's flat buffers (or, once
        the sender's signal has come, is copied from the shared bucket, unless the model reads that bucket in
        place), then the loose entries are copied out. Returns how many tensors were set."""
        if self.shared is not None:
            self.broadcast(torch.zeros(1))
        for i, flat in enumerate(weights.flats):
            if self.shared is None:
                self.broadcast(flat)
            elif flat.data_ptr() != self.shared.tensors[i].data_ptr():
                flat.copy_(self.shared.tensors[i])
        for view, t, scale in weights.loose:
            if scale is None:
                t.copy_(view)
            else:
                set_fp8_weight(t, scale, view)
        if self.shared is not None:
            self.all_copied()
        return weights.num_names

    def receive_each(self, load: Callable[[list[tuple[str, torch.Tensor]]], object]) -> int:
        """Ranks 1..R, an engine that loads weights by name (vLLM): each bucket arrives into a buffer of this
        group's (one per dtype, reused by the next bucket), or is read where it is in the shared buckets once
        the sender's signal has come, and its (name, tensor view) pairs go to `load`, which must have copied them
        when it returns. Returns how many tensors were handed over."""
        if self.shared is not None:
            self.broadcast(torch.zeros(1))
        count = 0
        for i, bucket in enumerate(self.buckets):
            if self.shared is None:
                flat = self._scratch(bucket)
                self.broadcast(flat)
            else:
                flat = self.shared.tensors[i]
            named = list(unpack(flat, bucket).items())
            load(named)
            count += len(named)
        if self.shared is not None:
            self.all_copied()
        return count

    def _scratch(self, bucket: list[TensorMeta]) -> torch.Tensor:
        """A flat buffer for `bucket` on this group's device: the front of the buffer kept for its dtype, grown
        to the largest bucket of that dtype on first use."""
        dtype = bucket[0].torch_dtype
        if dtype not in self.scratch:
            largest = max(sum(m.numel for m in b) for b in self.buckets if b[0].torch_dtype == dtype)
            self.scratch[dtype] = torch.empty(largest, dtype=dtype, device=self.device)
        return self.scratch[dtype][:sum(m.numel for m in bucket)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_address() -> str:
    """tcp://this-node:free-port, for a process group's rank 0 to host the group's store."""
    return f"tcp://{node_ip()}:{free_port()}"


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
            f"{diff:.4g} per token on average (tolerance rl.sync.check_tol={tol:g}); the rollout engines do not "
            "hold the trained weights")
    return diff
