"""Partial rollouts (`rl.rollout.partial_rollouts: true` with `max_staleness: 1`) end to end on Ray, with the toy task
of test_grpo_run: the sync lands while the engines still sample the next step's rollouts, those sequences go on
under the new weights, and every token's lag is logged. A test-only gate holds each engine between two steps of
that generation until the sync is through, so sequences spanning two versions are certain, not a matter of
timing. A SIGKILLed run resumes and takes every step once (its samples depend on timing, so only the step
sequence is compared, not the values)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r1pipe.stages.grpo import PREFETCH_FILE, GRPOTrainer, run_grpo
from test_grpo_async import async_config, metrics
from test_grpo_run import context, grpo_config, ray_cluster, task  # noqa: F401 (fixtures)

PARTIAL = {"rollout.partial_rollouts": True}


def gate() -> tuple:
    """(close, open) to run in a rollout actor (`__ray_call__`; made here so that Ray ships them by value, the
    actors cannot import this module): `close` makes the engine wait between two steps, from its next step on,
    until `open`."""

    def close(worker) -> None:
        llm = worker.llm
        opened, take, since = threading.Event(), llm.scheduler.take_retired, llm.stats["steps"]

        def take_retired():  # the engine loop calls it after each step, outside the step lock
            if llm.stats["steps"] > since and not opened.wait(120):
                raise TimeoutError("the gate was never opened")
            return take()

        llm.scheduler.take_retired = take_retired
        worker.test_gate = opened, take

    def open_(worker) -> None:
        opened, take = worker.test_gate
        worker.llm.scheduler.take_retired = take
        opened.set()

    return close, open_


def test_a_sync_lands_mid_generation_and_each_token_logs_its_version(ray_cluster, task, tmp_path, monkeypatch):
    prefetch, sync = GRPOTrainer.prefetch, GRPOTrainer.sync
    close_gate, open_gate = gate()

    def gated_prefetch(self, stream):  # the next step's rollouts stop after their first engine step ...
        self.rollout.on_each("__ray_call__", close_gate)
        self.gated = True
        return prefetch(self, stream)

    def gated_sync(self, step):  # ... until the new weights are in
        try:
            return sync(self, step)
        finally:
            if getattr(self, "gated", False):
                self.rollout.on_each("__ray_call__", open_gate)
                self.gated = False

    monkeypatch.setattr(GRPOTrainer, "prefetch", gated_prefetch)
    monkeypatch.setattr(GRPOTrainer, "sync", gated_sync)
    cfg = grpo_config(task, {"steps": 4, "rollout.max_staleness": 1, "resources.trainer.workers": 1,
                             "sync.check_every": 1, "data.eval_every": 2, **PARTIAL})
    run_grpo(cfg, context(tmp_path, task["model"]))
    rows = metrics(tmp_path)[1:]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["data_position"] for r in rows] == [4, 8, 12, 16]  # no prompt twice, none skipped
    assert rows[0]["staleness/max"] == 0 and rows[0]["staleness/spanning_share"] == 0
    for r in rows[1:]:  # sampled from one version before the sync, the rest after it: lags 1 then 0
        assert r["staleness/min"] == 0 and r["staleness/max"] == 1 and 0 < r["staleness/mean"] < 1, r
        assert r["staleness/spanning_share"] > 0
        assert "tis/clipped_share" in r and r["tis/weight_mean"] > 0
    # each sync's probe waits for the engines to be idle: the next step, after its rollouts are in (the last
    # sync has no generation in flight, so it is checked at once)
    assert "sync/probe_logprob_diff" not in rows[0]
    assert all(r["sync/probe_logprob_diff"] < 0.1 for r in rows[1:])
    assert "heldout_accuracy" in rows[1]  # a held-out check waits for the generation in flight


def test_partial_rollouts_are_refused_without_staleness_or_with_vllm(task):
    with pytest.raises(ValueError, match=r"rl\.rollout\.partial_rollouts: true needs max_staleness: 1"):
        grpo_config(task, PARTIAL)
    with pytest.raises(ValueError, match=r"rl\.rollout\.partial_rollouts with backend: vllm"):
        grpo_config(task, {"rollout.max_staleness": 1, "rollout.backend": "vllm", **PARTIAL})


KILLED_RUN = """
import sys, json
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_grpo_async as t
task = json.loads({task!r})
t.run_grpo(t.async_config(task, {overrides!r}), t.context(Path({run_dir!r}), task["model"], {address!r}))
"""


@pytest.mark.slow  # about 2 minutes on 2 shared cores: a run killed after its step-2 checkpoint, then resumed
def test_a_killed_partial_run_resumes_and_takes_every_step_once(ray_cluster, task, tmp_path):
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), task=json.dumps(task), run_dir=str(tmp_path),
                               address=ray_cluster, overrides=PARTIAL)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "rl" / "checkpoints" / "step_000002"
    deadline = time.time() + 240
    while not (ckpt / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (ckpt / "trainer_state.json").exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "late"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / PREFETCH_FILE).exists()  # step 3's rollouts, finished before the checkpoint was written
    assert not (tmp_path / "rl" / "checkpoints" / "step_000004").exists()

    out = run_grpo(async_config(task, PARTIAL), context(tmp_path, task["model"]))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["data_position"] for r in rows[1:]] == [4, 8, 12, 16]
    assert all(r["staleness/max"] <= 1 for r in rows[1:])
    assert out["steps"] == 4 and Path(out["model_path"]).name == "step_000004"
