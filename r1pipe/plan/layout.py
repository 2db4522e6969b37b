"""Where a stage's GPU workers go on the nodes, and the smallest layout whose devices hold what they must.

`place` puts each worker's GPU bundle on a node the way the stage's Ray placement group does
(r1pipe.workers.placement): PACK / STRICT_PACK fill the nodes in order, SPREAD / STRICT_SPREAD put each
bundle on the node with the most free GPUs. `smallest_trainer` and `smallest_engine` search the layouts a
recipe can ask for (more workers, that is more nodes; a larger ep_size; optimizer or also parameter offload)
for the one with the fewest nodes whose per-device bytes fit, given a function from the layout to the bytes.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

from .memory import OFFLOADS

MAX_NODES = 512  # the search gives up past this many nodes


@dataclass(frozen=True)
class Role:
    """`workers` actors of one role, each asking `gpus` GPUs (0: CPU only)."""

    name: str  # trainer | rollout | reward
    workers: int
    gpus: float


@dataclass(frozen=True)
class Slot:
    """Workers first..first+count-1 of `role` on one node."""

    role: str
    first: int
    count: int


def gpus_needed(roles: list[Role]) -> float:
    return sum(r.workers * r.gpus for r in roles)


def nodes_needed(roles: list[Role], gpus_per_node: int) -> int:
    """The fewest nodes whose GPUs hold every worker's bundle (a bundle never spans nodes)."""
    n = max(1, math.ceil(gpus_needed(roles) / gpus_per_node - 1e-9))
    while place(roles, n, gpus_per_node) is None:
        n += 1
    return n


def place(roles: list[Role], nodes: int, gpus_per_node: int, strategy: str = "PACK") -> list[list[Slot]] | None:
    """Each node's slots, in role and worker order; None when the bundles do not fit on `nodes` nodes."""
    free = [float(gpus_per_node)] * nodes
    slots: list[list[Slot]] = [[] for _ in range(nodes)]
    for role in roles:
        if role.gpus <= 0:
            continue
        if role.gpus > gpus_per_node:
            return None
        placed = 0
        if "PACK" in strategy:  # first fit, a run of equal bundles at a time
            for n in range(nodes):
                k = min(role.workers - placed, int(free[n] / role.gpus + 1e-9))
                if k > 0:
                    free[n] -= k * role.gpus
                    slots[n].append(Slot(role.name, placed, k))
                    placed += k
        else:  # each bundle to the node with the most free GPUs (the lowest index among equals)
            heap = [(-f, n) for n, f in enumerate(free)]
            heapq.heapify(heap)
            while placed < role.workers and -heap[0][0] + 1e-9 >= role.gpus:
                f, n = heapq.heappop(heap)
                free[n] = -f - role.gpus
                last = slots[n][-1] if slots[n] else None
                if last is not None and last.role == role.name and last.first + last.count == placed:
                    slots[n][-1] = Slot(role.name, last.first, last.count + 1)
                else:
                    slots[n].append(Slot(role.name, placed, 1))
                placed += 1
                heapq.heappush(heap, (-free[n], n))
        if placed < role.workers:
            return None
    return slots


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class TrainerLayout:
    workers: int
    ep_size: int
    offload: str
    bytes: float  # per device


@dataclass(frozen=True)
class EngineLayout:
    workers: int  # rollout workers: workers / ep_size engines
    ep_size: int
    bytes: float  # per device


def smallest_trainer(per_device: Callable[[int, int, str], float], budget: float, workers: int, ep_size: int,
                     step: int, n_experts: int, nodes_for: Callable[[int], int],
                     offloads: tuple[str, ...] = OFFLOADS, max_workers: int = MAX_NODES * 8) -> TrainerLayout | None:
    """The trainer layout within `budget` per device (per_device(workers, ep_size, offload)) on the fewest nodes
    (nodes_for(workers)); among those the least offload (in the order of `offloads`), then the smallest ep_size
    (>= the given one, dividing the workers and the n_experts routed experts; 1 without experts), then the fewest
    workers. Worker counts tried: the given one, then multiples of `step` (a node's worth)."""
    eps = divisors(n_experts) if n_experts else [1]
    largest = max(workers, max_workers - max_workers % step)
    if per_device(largest, max(e for e in eps if not largest % e), offloads[-1]) > budget:
        return None  # not even the most favourable layout searched fits (the bytes only shrink towards it)
    best, best_key = None, None
    for w in [workers, *range(_next_multiple(workers + 1, step), max_workers + 1, step)]:
        nodes = nodes_for(w)
        if best_key is not None and nodes > best_key[0]:
            break
        for rank, offload in enumerate(offloads):
            fit = next((ep for ep in eps if ep >= ep_size and not w % ep and per_device(w, ep, offload) <= budget), None)
            if fit is not None:
                key = (nodes, rank, fit, w)
                if best_key is None or key < best_key:
                    best, best_key = TrainerLayout(w, fit, offload, per_device(w, fit, offload)), key
                break
    return best


def smallest_engine(per_device: Callable[[int], float], budget: float, workers: int, ep_size: int,
                    n_experts: int) -> EngineLayout | None:
    """The smallest engine ep_size (>= the given one, dividing the n_experts routed experts) whose per-device
    bytes fit `budget`; the rollout workers grow to a multiple of it (at least one engine)."""
    for ep in divisors(n_experts) if n_experts else [1]:
        if ep < ep_size:
            continue
        b = per_device(ep)
        if b <= budget:
            return EngineLayout(_next_multiple(max(workers, ep), ep), ep, b)
    return None


def _next_multiple(n: int, step: int) -> int:
    return -(-n // step) * step
