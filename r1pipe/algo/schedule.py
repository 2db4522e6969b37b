"""Learning-rate schedules as pure functions of the step."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps to lr, then cosine decay to min_ratio * lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_lr(schedule: str, step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    """The lr of `step` (0-based) of `total` under a recipe's optim.schedule: linear warmup over `warmup`
    steps to lr, then constant (`constant`) or cosine to min_ratio * lr at the last step (`cosine`)."""
    if schedule == "cosine":
        return warmup_cosine(step, total, warmup, lr, min_ratio)
    if schedule == "constant":
        return lr * (step + 1) / warmup if step < warmup else lr
    raise ValueError(f"schedule={schedule!r}: constant or cosine")
