"""Append-only metrics log: one JSON object per step in metrics.jsonl, mirrored to TensorBoard.

A stage (re)starting at step k (the step of the checkpoint it resumes from; 0 without one) keeps the
rows of steps up to k only when k > 0: rows a killed run logged after its last checkpoint, or before
its first one, are dropped, so each step appears exactly once. So are their TensorBoard events (all
of them without a checkpoint; after step k through TensorBoard's purge_step), and the PNG curves drawn
from the old log (`plots/`) are removed: the stage draws them again from the log it writes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (the process was killed mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors to floats, NaN/inf to None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes `metrics.jsonl` (and TensorBoard events under `tensorboard/`) in `log_dir`."""

    def __init__(self, log_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        """`resume_step`: the step of the checkpoint the stage resumes from (0: none, a fresh start)."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if resume_step > 0 and r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        for png in (self.log_dir / "plots").glob("*.png"):
            png.unlink()
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

            tb_dir = self.log_dir / "tensorboard"
            if resume_step > 0:  # purge_step: TensorBoard drops the events a killed run wrote after step k
                self._tb = SummaryWriter(str(tb_dir), purge_step=resume_step + 1)
            else:
                shutil.rmtree(tb_dir, ignore_errors=True)
                self._tb = SummaryWriter(str(tb_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
