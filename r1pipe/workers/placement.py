"""Ray resources of a stage's workers: what each role asks for, checked against the cluster up front.

The policy (trainer) and rollout actors are placed in one placement group created before any of them starts,
and waited for with a timeout: a recipe that asks for more than the cluster has fails at once (or
after `timeout_s` when the totals fit but no node can hold a bundle) with the arithmetic, asked vs
available per resource, instead of Ray queueing the actors forever. Reward workers are counted in
the same arithmetic (their pool places them itself, from what the group leaves free).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r1pipe.errors import ResourceError
from r1pipe.stages.sections import Workers


@dataclass
class RoleResources:
    """`count` actors of one role, each asking `cpus`, `gpus` and `custom` Ray resources; `key` is the
    recipe section the error message names (e.g. rl.resources.trainer)."""

    role: str  # policy | rollout | reward
    count: int
    cpus: float
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    key: str = ""
    in_group: bool = True  # placed in the placement group (reward workers are placed by their pool)

    def bundle(self) -> dict[str, float]:
        """One actor's Ray resource bundle (zero entries left out: Ray refuses them)."""
        out = {"CPU": float(self.cpus), "GPU": float(self.gpus), **{k: float(v) for k, v in self.custom.items()}}
        return {k: v for k, v in out.items() if v > 0}


class InsufficientResources(ResourceError):
    """The workers cannot be placed; the message says what to change, then holds the arithmetic (the
    short resources first)."""


@dataclass
class ResourcePlan:
    roles: list[RoleResources]

    def __post_init__(self) -> None:
        for r in self.roles:
            if r.cpus <= 0:
                raise ValueError(f"{r.key}.cpus must be > 0 (every actor needs some CPU), got {r.cpus}")
            if r.gpus < 0 or any(v < 0 for v in r.custom.values()):
                raise ValueError(f"{r.key}: resources must be >= 0, got gpus={r.gpus} custom={r.custom}")

    def totals(self) -> dict[str, float]:
        """Resource name -> the sum over every actor of every role."""
        out: dict[str, float] = {}
        for r in self.roles:
            for name, value in r.bundle().items():
                out[name] = out.get(name, 0.0) + r.count * value
        return out

    def bundles(self) -> list[dict[str, float]]:
        """The placement group's bundles: one per actor of the roles placed in the group, role by role."""
        return [r.bundle() for r in self.roles if r.in_group for _ in range(r.count)]

    def bundle_index(self, role: str, index: int) -> int:
        """Position of actor `index` of `role` among bundles()."""
        start = 0
        for r in self.roles:
            if not r.in_group:
                continue
            if r.role == role:
                if not 0 <= index < r.count:
                    raise IndexError(f"{role} actor {index} of {r.count}")
                return start + index
            start += r.count
        raise KeyError(f"role {role!r} is not placed in the group")

    def arithmetic(self, available: dict[str, float], total: dict[str, float] | None = None) -> list[str]:
        """One line per resource: asked = the per-role products, available (of total), what is short."""
        lines = []
        for name, asked in sorted(self.totals().items()):
            terms = " + ".join(f"{r.role} {r.count} x {_num(r.bundle().get(name, 0.0))}" for r in self.roles
                               if r.bundle().get(name, 0.0) > 0)
            have = float(available.get(name, 0.0))
            of = f" of {_num(float(total.get(name, 0.0)))} in the cluster" if total is not None else ""
            short = f"  <- short by {_num(asked - have)}" if asked > have + 1e-9 else ""
            lines.append(f"  {name}: asked {_num(asked)} = {terms}; available {_num(have)}{of}{short}")
        return lines

    def shortfall(self, available: dict[str, float]) -> dict[str, float]:
        """Resource -> how much more is asked than available (only the short ones)."""
        return {n: a - float(available.get(n, 0.0)) for n, a in self.totals().items() if a > float(available.get(n, 0.0)) + 1e-9}


def role_resources(role: str, workers: Workers, key: str, in_group: bool = True) -> RoleResources:
    """The RoleResources of a recipe's Workers section `key` (e.g. rl.resources.rollout)."""
    return RoleResources(role, workers.workers, workers.cpus, workers.gpus, dict(workers.custom), key, in_group)


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass
class Placement:
    """A ready placement group and the plan it was made from; `options` places one actor in it."""

    plan: ResourcePlan
    group: Any  # ray.util.placement_group.PlacementGroup

    def options(self, role: str, index: int) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)` putting actor `index` of `role` in its bundle."""
        r = next(r for r in self.plan.roles if r.role == role)
        return {
            "num_cpus": r.cpus, "num_gpus": r.gpus, "resources": dict(r.custom) or None,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.plan.bundle_index(role, index)),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)


def reserve(plan: ResourcePlan, timeout_s: float = 60.0, strategy: str = "PACK", stage: str = "GRPO") -> Placement:
    """Check the plan against the cluster's resources, then create its placement group and wait at
    most `timeout_s` for it (resources still held by others may free up meanwhile). Raises InsufficientResources with the arithmetic (per resource, and
    per node when the totals fit but the bundles do not)."""
    total = ray.cluster_resources()
    if plan.shortfall(total):  # can never fit: fail now (what is merely busy gets the timeout below)
        lines = plan.arithmetic(total)
        keys = ", ".join(r.key for r in plan.roles)
        raise InsufficientResources(
            f"the {stage} workers ask for more than the Ray cluster has (lower the workers, cpus or gpus of {keys}, "
            "or give the cluster more: cluster.num_cpus / num_gpus, more nodes):\n"
            + "\n".join([line for line in lines if "<- short by" in line] + [line for line in lines if "<- short by" not in line]))
    group = placement_group(plan.bundles(), strategy=strategy, name="")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        nodes = [f"  node {n['NodeManagerAddress']} {n['NodeID'][:8]}: "
                 + ", ".join(f"{k} {_num(v)}" for k, v in sorted(n["Resources"].items()) if not k.startswith("node:")
                             and k not in ("memory", "object_store_memory"))
                 for n in ray.nodes() if n.get("Alive")]
        raise InsufficientResources(
            f"the {stage} workers' placement group ({strategy}) was not ready after {timeout_s:g}s "
            f"({plan.roles[0].key.rsplit('.', 1)[0]}.placement_timeout_s): the totals fit the cluster but not what is free now, or no node can hold a "
            "bundle:\n"
            + "\n".join(plan.arithmetic(ray.available_resources(), ray.cluster_resources()))
            + f"\n  bundles: {plan.bundles()}\n" + "\n".join(nodes)) from None
    return Placement(plan, group)
