"""Tensors that processes on one machine share through /dev/shm, for the CPU paths where gloo would copy
them over TCP: the weight-sync buckets (trainer -> engines) and the replicas' gradients.

Every member maps the same files (torch.from_file, shared), then the creator unlinks them: the mappings
stay valid and nothing is left behind whatever happens to the processes later. On GPUs NCCL already
uses the machine's shared memory and P2P, and these paths are not taken.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile

import torch
import torch.distributed as dist

try:
    import ray
except ImportError:  # one process without Ray (a device image without it): the workers run in-process
    ray = None

SHARED_MEMORY = "/dev/shm"


def node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray): processes that share it share /dev/shm."""
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else socket.gethostname()


def node_ip() -> str:
    """This node's address for the other workers' process groups (Ray's view of it; loopback without Ray)."""
    return ray.util.get_node_ip_address() if ray is not None else "127.0.0.1"


def make_directory(nbytes: int) -> str | None:
    """A new directory under /dev/shm for `nbytes` of tensors; None where the machine has none or it has not
    that much room with a margin (a full tmpfs would kill a process writing into its mapping, e.g. Docker's
    default 64 MB /dev/shm under a larger model): the callers then use the process group."""
    if not os.path.isdir(SHARED_MEMORY):
        return None
    stat = os.statvfs(SHARED_MEMORY)
    if stat.f_bavail * stat.f_frsize < 1.25 * nbytes + (64 << 20):
        return None
    return tempfile.mkdtemp(prefix="r1pipe-", dir=SHARED_MEMORY)


def unlink(directory: str) -> None:
    """Remove the files once every member has mapped them."""
    shutil.rmtree(directory, ignore_errors=True)


def mapped(directory: str, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of `numel` elements backed by the shared file `name` (created zero-filled if new)."""
    return torch.from_file(os.path.join(directory, name), shared=True, size=numel, dtype=dtype)


class SharedBuckets:
    """The weight-sync buckets (r1pipe.workers.weight_sync) as flat tensors in shared memory, one file each."""

    def __init__(self, directory: str, buckets: list) -> None:
        self.tensors = [mapped(directory, f"bucket{i}", sum(m.numel for m in bucket), bucket[0].torch_dtype)
                        for i, bucket in enumerate(buckets)]


class SharedGradients:
    """Replicas' gradients summed in shared memory. Rank r's gradients live in slot r of a region all ranks
    map; `all_reduce` sums part r of every slot on rank r and writes the sum back into every slot (a
    reduce-scatter and an all-gather, in place) between two barriers of the default process group. Every rank
    ends with the same sums, each part added in slot order by one rank, and no tensor crosses a socket."""

    def __init__(self, directory: str, numel: int, dtype: torch.dtype, rank: int, world_size: int) -> None:
        self.slots = [mapped(directory, f"grad{i}", numel, dtype) for i in range(world_size)]
        bounds = [round(i * numel / world_size) for i in range(world_size + 1)]
        self.rank, self.part = rank, slice(bounds[rank], bounds[rank + 1])

    @property
    def local(self) -> torch.Tensor:
        """This rank's slot: its parameters' gradients are views of it."""
        return self.slots[self.rank]

    def all_reduce(self) -> None:
        dist.barrier()  # every rank has written its gradients
        total = self.slots[0][self.part].clone()
        for slot in self.slots[1:]:
            total += slot[self.part]
        for slot in self.slots:
            slot[self.part] = total
        dist.barrier()  # every part is summed
