"""Asynchronous GRPO (`rl.rollout.max_staleness: 1`) end to end on Ray, with the toy task of test_grpo_run: the
next step's rollouts are sampled while the trainer trains, so every batch after the first is exactly one
policy version old and is corrected by truncated importance sampling; a SIGKILLed run resumes on the
rollouts its checkpoint saved and takes the uninterrupted run's steps."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.grpo import PREFETCH_FILE, run_grpo
from test_grpo_run import context, grpo_config, ray_cluster, task  # noqa: F401 (fixtures)


def async_config(task: dict, overrides: dict | None = None) -> GRPOConfig:
    cfg = grpo_config(task, {"steps": 4, "checkpoint.every": 2, "resources.trainer.workers": 1, "rollout.max_staleness": 1,
                             **(overrides or {})})
    cfg.rewards.extra["test_grpo_run:slow_zero"] = 0.0  # a step of about a second: room to kill between checkpoints
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]


def test_one_version_old_rollouts_learn_and_log_their_versions(ray_cluster, task, tmp_path):
    run_grpo(grpo_config(task, {"steps": 6, "rollout.max_staleness": 1, "resources.trainer.workers": 1}),
             context(tmp_path, task["model"]))
    rows = metrics(tmp_path)[1:]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the first batch is sampled by the base (nothing to overlap yet); every later one while the previous trained
    assert rows[0]["staleness/max"] == 0
    assert all(r["staleness/min"] == r["staleness/max"] == 1 for r in rows[1:]), [r["staleness/max"] for r in rows]
    assert all("tis/clipped_share" in r and r["tis/weight_mean"] > 0 for r in rows)  # decoupled PPO's correction
    assert all(r["time/trainer_idle"] >= 0 and r["time/engine_idle"] >= 0 for r in rows)
    assert [r["data_position"] for r in rows] == [4, 8, 12, 16, 20, 24]  # no prompt twice, none skipped
    assert sum(r["reward/mean"] for r in rows[-2:]) > sum(r["reward/mean"] for r in rows[:2])
    assert {"staleness", "idle", "importance"} <= {p.stem for p in (tmp_path / "rl" / "plots").glob("*.png")}


KILLED_RUN = """
import sys, json
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_grpo_async as t
task = json.loads({task!r})
t.run_grpo(t.async_config(task), t.context(Path({run_dir!r}), task["model"], {address!r}))
"""


def test_an_async_run_resumes_on_its_saved_rollouts_and_takes_the_same_steps(ray_cluster, task, tmp_path):
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), task=json.dumps(task), run_dir=str(tmp_path),
                               address=ray_cluster)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "rl" / "checkpoints" / "step_000002"
    deadline = time.time() + 240
    while not (ckpt / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (ckpt / "trainer_state.json").exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "late"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / PREFETCH_FILE).exists()  # step 3's rollouts, sampled by version 1 while step 2 trained
    assert not (tmp_path / "rl" / "checkpoints" / "step_000004").exists()

    resumed_out = run_grpo(async_config(task), context(tmp_path, task["model"]))
    straight_out = run_grpo(async_config(task), context(tmp_path / "straight", task["model"]))
    resumed, straight = metrics(tmp_path), metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed, straight, strict=True):
        for key, value in b.items():
            if not key.startswith(("time/", "tokens_per_second")):
                assert a[key] == pytest.approx(value, abs=1e-6), (key, b["step"])
    assert resumed[3]["staleness/max"] == 1  # step 3 trained on the saved, one-version-old rollouts
    from r1pipe.model import load_pretrained

    a, b = load_pretrained(resumed_out["model_path"]).state_dict(), load_pretrained(straight_out["model_path"]).state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_staleness_above_one_and_async_without_tis_are_refused(task):
    with pytest.raises(ValueError, match=r"rl\.rollout\.max_staleness must be 0"):
        grpo_config(task, {"rollout.max_staleness": 2})
    with pytest.raises(ValueError, match=r"rl\.algorithm\.tis: false with rollout\.max_staleness: 1"):
        grpo_config(task, {"rollout.max_staleness": 1, "algorithm.tis": False})
