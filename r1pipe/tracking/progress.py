"""Progress of every long loop (pre-training, SFT, GRPO, generation, grading), in one place.

On a terminal it is a rich progress bar with the latest key metrics. When the output is not a
terminal (CI, nohup, a log file) a bar cannot redraw, so plain lines are printed instead: at the
first step, then at most every `interval_s` seconds (default 30, or the R1PIPE_PROGRESS_SECONDS
environment variable), and at the last step, e.g.

    pretrain: step 120/450 (27%)  loss=2.31  grad_norm=0.52  elapsed 1m02s  eta 2m51s
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "R1PIPE_PROGRESS_SECONDS"


def default_interval() -> float:
    """Seconds between plain progress lines: R1PIPE_PROGRESS_SECONDS when set to a number >= 0, else 30."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def format_seconds(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_metrics(metrics: dict[str, Any], show: tuple[str, ...]) -> str:
    """'loss=2.31  reward/mean=0.4' for the `show` keys that hold numbers."""
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in show
                     if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool))


class StepProgress:
    """`with StepProgress(total, start, "grpo", show=("reward/mean",)) as p: p.advance(metrics)`.

    `unit` names what is counted ("step", "prompt", "response"); `transient` removes the bar when
    done (terminal only); `enabled=False` shows nothing; `file` is where it writes (stdout)."""

    def __init__(self, total: int, start: int = 0, description: str = "grpo", show: tuple[str, ...] = (), *,
                 unit: str = "step", interval_s: float | None = None, transient: bool = False, enabled: bool = True,
                 file: IO[str] | None = None):
        self.total, self.done, self.first = int(total), int(start), int(start)
        self.description, self.show, self.unit = description, tuple(show), unit
        self.interval_s = default_interval() if interval_s is None else float(interval_s)
        self.enabled = enabled
        self.file = file if file is not None else sys.stdout
        self.terminal = Console(file=self.file).is_terminal
        self._info = ""
        self._t0 = time.monotonic()
        self._last_line: float | None = None
        self._progress: Progress | None = None
        if enabled and self.terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=self.file), transient=transient,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def advance(self, metrics: dict[str, Any] | None = None, n: int = 1) -> None:
        """`n` more done; `metrics` (the latest values) are shown for the `show` keys."""
        self.done += n
        if metrics is not None:
            self._info = format_metrics(metrics, self.show)
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=self._info)
        elif self.enabled:
            now = time.monotonic()
            last = self.done >= self.total
            if self._last_line is None or last or now - self._last_line >= self.interval_s:
                self._last_line = now
                print(self.line(now), file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: step/total, percent, metrics, elapsed and the time left."""
        elapsed = (time.monotonic() if now is None else now) - self._t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        parts = [f"{self.description}: {self.unit} {self.done}/{self.total}{pct}"]
        if self._info:
            parts.append(self._info)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.first < self.done < self.total:
            parts.append(f"eta {format_seconds(elapsed / (self.done - self.first) * (self.total - self.done))}")
        return "  ".join(parts)

    def start(self) -> "StepProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> "StepProgress":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
