"""Progress of long loops when the output is not a terminal: plain lines, at the first and last step
and every interval in between, with step/total, the chosen metrics, elapsed time and the time left."""
from __future__ import annotations

import io

from r1pipe.tracking import progress as progress_module
from r1pipe.tracking.progress import StepProgress, default_interval, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_the_first_step_every_interval_and_the_last(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    out = io.StringIO()  # not a terminal
    with StepProgress(10, 0, "pretrain", show=("loss", "note"), interval_s=30, file=out) as p:
        for step in range(10):
            clock.now += 7.0  # a step every 7 s: lines at steps 1, 6 (42 s > 30 s after 7 s), the last
            p.advance({"loss": 2.5 - step * 0.1, "note": "text is not shown", "grad_norm": 1.0})
    lines = out.getvalue().splitlines()
    assert lines == [
        "pretrain: step 1/10 (10%)  loss=2.5  elapsed 7s  eta 1m03s",
        "pretrain: step 6/10 (60%)  loss=2  elapsed 42s  eta 28s",
        "pretrain: step 10/10 (100%)  loss=1.6  elapsed 1m10s",
    ]


def test_a_resumed_loop_counts_from_its_start_and_eta_uses_this_run_only(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    out = io.StringIO()
    with StepProgress(100, 90, "grpo", interval_s=0, unit="step", file=out) as p:
        clock.now += 10.0
        p.advance()
    assert out.getvalue() == "grpo: step 91/100 (91%)  elapsed 10s  eta 1m30s\n"


def test_disabled_and_interval_from_the_environment(monkeypatch):
    out = io.StringIO()
    with StepProgress(3, 0, "grading", enabled=False, file=out) as p:
        p.advance(n=3)
    assert out.getvalue() == ""
    monkeypatch.setenv("R1PIPE_PROGRESS_SECONDS", "5")
    assert default_interval() == 5.0
    monkeypatch.setenv("R1PIPE_PROGRESS_SECONDS", "soon")
    assert default_interval() == 30.0
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 7322)] == ["0s", "59s", "1m01s", "59m59s", "2h02m"]
