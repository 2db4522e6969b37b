"""Asynchronous GRPO (`rl.rollout.max_staleness: 1`) end to end on Ray, with the toy task of test_grpo_run: the
next step's rollouts are sampled while the trainer trains, so every batch after the first is exactly one
policy version old and is corrected by truncated importance sampling; a SIGKILLed run (one policy worker, a
KL reference) resumes on the rollouts its checkpoint saved and takes the uninterrupted run's steps (run
meanwhile, in the test's process)."""
import json
from pathlib import Path

import pytest
import torch

from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.grpo import PREFETCH_FILE, run_grpo
from test_grpo_run import assert_same_steps, context, grpo_config, killed_and_straight, ray_cluster, task  # noqa: F401 (fixtures)


def async_config(task: dict, overrides: dict | None = None) -> GRPOConfig:
    """One policy worker, one-version-old rollouts; kl_coef > 0: the reference must stay the base model across
    a kill, not become the resumed checkpoint."""
    cfg = grpo_config(task, {"steps": 4, "checkpoint.every": 2, "resources.trainer.workers": 1, "rollout.max_staleness": 1,
                             "algorithm.kl_coef": 0.01, **(overrides or {})})
    cfg.rewards.extra["test_grpo_run:slow_zero"] = 0.0  # in the run to be killed, a step of about a second
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


def test_an_async_run_resumes_on_its_saved_rollouts_and_takes_the_same_steps(ray_cluster, task, tmp_path, capsys, killed_run):
    """One policy worker on a model with an MTP module (never stepped: no optimizer state), a KL reference:
    SIGKILLed after its step-2 checkpoint, the run loses and repeats no step and ends on the uninterrupted
    run's metrics (KL included) and weights."""
    straight_out = killed_and_straight(killed_run, async_config, task, tmp_path, tmp_path / "straight", ray_cluster, step=2)
    ckpt = tmp_path / "rl" / "checkpoints" / "step_000002"
    assert (ckpt / PREFETCH_FILE).exists()  # step 3's rollouts, sampled by version 1 while step 2 trained
    capsys.readouterr()

    resumed_out = run_grpo(async_config(task), context(tmp_path, task["mtp_model"]))
    assert "resuming after step 2" in capsys.readouterr().out
    resumed, straight = metrics(tmp_path), metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    # the data stream continues where the checkpoint left it: 4 prompts a step, none twice
    assert [r["data_position"] for r in resumed[1:]] == [4, 8, 12, 16]
    assert Path(resumed_out["model_path"]).name == "step_000004"
    assert json.loads((tmp_path / "rl" / "summary.json").read_text())["steps"] == 4
    assert all(r["kl"] > 0 for r in resumed[2:]), resumed  # a re-anchored reference would give kl == 0 at step 3
    assert_same_steps(resumed, straight)
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
