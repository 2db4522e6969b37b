"""Console progress for a training loop: a rich progress bar with the latest key metrics."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    """`with StepProgress(total, start) as p: p.advance({"reward": 0.4})` shows step, ETA and metrics."""

    def __init__(self, total: int, start: int = 0, description: str = "grpo", show: tuple[str, ...] = ()):
        self.show = show
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def advance(self, metrics: dict[str, Any]) -> None:
        info = "  ".join(f"{k}={metrics[k]:.3g}" for k in self.show if isinstance(metrics.get(k), (int, float)))
        self._progress.update(self._task, advance=1, info=info)

    def __enter__(self) -> "StepProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
