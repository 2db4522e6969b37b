"""Recipe sections that have one shape in every stage: workers and placement, the optimizer, parallelism
and checkpoints. A stage config holds them as typed fields (`rl.resources.trainer.workers`,
`sft.optim.lr`, `pretrain.checkpoint.every`); each stage sets its own defaults with
`field(default_factory=lambda: Optim(lr=...))`.

Each `__post_init__` checks its values and raises a ValueError whose message starts with the key, relative
to the section; the recipe loader (r1pipe.config) puts the section's full key in front. Nothing here
imports torch or Ray.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCHEDULES = ("constant", "cosine")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_lr(lr: float, name: str = "lr") -> None:
    """A learning rate is a finite number > 0 (NaN fails `> 0` too)."""
    if not (lr > 0 and lr != float("inf")):
        raise ValueError(f"{name} must be a number > 0, got {lr}")


@dataclass
class Workers:
    """One role's Ray actors: how many, and what each asks for."""

    workers: int = 1
    cpus: float = 1.0  # per worker (Ray's share; every actor needs some CPU)
    gpus: float = 0.0  # per worker
    threads: int = 1  # torch threads per worker; 0 keeps the process's default (reward workers: up to 8 scoring threads)
    custom: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker, e.g. {node_a: 1}

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not (self.cpus > 0 and math.isfinite(self.cpus)):
            raise ValueError(f"cpus must be > 0 (every actor needs some CPU), got {self.cpus}")
        if not (self.gpus >= 0 and math.isfinite(self.gpus)):
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: the default), got {self.threads}")
        for name, value in dict(self.custom).items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"custom.{name} must be >= 0, got {value}")


@dataclass
class Resources:
    """Where a stage's actors run: the device and the Ray placement group holding them."""

    device: str = "cpu"  # cpu | cuda | cuda:N
    placement_strategy: str = "PACK"  # Ray placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 60.0  # fail (with the arithmetic) when the workers cannot be placed by then

    def __post_init__(self) -> None:
        if not DEVICE.match(self.device):
            raise ValueError(f"device={self.device!r}: expected cpu, cuda or cuda:N")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy={self.placement_strategy!r}: choose one of {PLACEMENT_STRATEGIES}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")


def _no_reward_gpus(reward: Workers) -> None:
    if reward.gpus:
        raise ValueError(f"reward.gpus={reward.gpus}: reward workers run rule-based rewards on CPU; leave it 0")


@dataclass
class TrainerResources(Resources):
    """A stage that trains one model: its trainer workers (kinds sft, pretrain)."""

    trainer: Workers = field(default_factory=lambda: Workers(threads=0))


@dataclass
class RLResources(Resources):
    """GRPO: the policy trainers, the rollout engines and the reward workers."""

    trainer: Workers = field(default_factory=lambda: Workers(cpus=0.5))
    rollout: Workers = field(default_factory=lambda: Workers(cpus=0.5))
    reward: Workers = field(default_factory=lambda: Workers(cpus=1.0, threads=0))

    def __post_init__(self) -> None:
        super().__post_init__()
        _no_reward_gpus(self.reward)


@dataclass
class SamplingResources(Resources):
    """Sampling a checkpoint and scoring the samples: rollout engines and reward workers (kinds
    rejection_sample, scorecard)."""

    rollout: Workers = field(default_factory=lambda: Workers(cpus=0.5))
    reward: Workers = field(default_factory=lambda: Workers(cpus=0.5, threads=0))

    def __post_init__(self) -> None:
        super().__post_init__()
        _no_reward_gpus(self.reward)


@dataclass
class Optim:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine (linear warmup, then cosine to min_lr_ratio * lr)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps (both schedules)
    min_lr_ratio: float = 0.1  # cosine: the last step's lr is min_lr_ratio * lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (inf: no clipping)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])

    def __post_init__(self) -> None:
        check_lr(self.lr)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: two numbers in [0, 1)")


@dataclass
class Parallelism:
    """How the trainer workers split the model (r1pipe.workers.sharding)."""

    fsdp: bool = True  # FSDP2-shard the model (and a reference) across the trainer workers; False: replicas
    fsdp_keep_gathered: bool = False  # gather parameters / reduce gradients once per step, not per micro-batch
    activation_checkpointing: bool = False  # recompute each block's attention in the backward
    ep_size: int = 1  # r1pipe V3: each MoE layer's routed experts split over this many trainer workers (needs fsdp)

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.ep_size > 1 and not self.fsdp:
            raise ValueError(f"ep_size={self.ep_size} needs fsdp: true (expert parallelism composes with FSDP2 for "
                             "the rest of the model)")


@dataclass
class Checkpointing:
    """Section `checkpoint`: how often a stage saves, and how many saves it keeps."""

    every: int = 10  # steps between checkpoints (the last step always saves)
    keep: int = 2  # newest checkpoints kept; 0 keeps every one

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.keep < 0:
            raise ValueError(f"keep must be >= 0 (0: keep every checkpoint), got {self.keep}")
