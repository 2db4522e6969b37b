"""The shared config sections (r1pipe.stages.sections): their checks name the full key, each stage keeps
its own defaults, and every key that moved into a section is refused naming its new place, in a recipe
file and in a command-line override alike."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1pipe.algo.schedule import scheduled_lr
from r1pipe.config import ConfigError, load_recipe, make_config, settings
from r1pipe.stages import get_stage
from r1pipe.stages.configs import MOVED_KEYS, GRPOConfig, PretrainConfig, RejectionSampleConfig, ScorecardConfig, SFTConfig
from r1pipe.stages.sections import Checkpointing, Optim, Workers


def test_each_stage_keeps_its_defaults():
    grpo, sft, pretrain = GRPOConfig(), SFTConfig(), PretrainConfig()
    assert (grpo.optim.lr, grpo.optim.schedule, grpo.optim.betas) == (1e-4, "constant", [0.9, 0.99])
    assert (grpo.checkpoint.every, grpo.checkpoint.keep) == (10, 2)
    r = grpo.resources
    assert (r.trainer.workers, r.trainer.cpus, r.trainer.threads, r.rollout.cpus, r.reward.cpus, r.reward.threads) == (1, 0.5, 1, 0.5, 1.0, 0)
    assert (sft.optim.lr, sft.optim.schedule, sft.optim.min_lr_ratio, sft.optim.betas) == (1e-4, "cosine", 0.1, [0.9, 0.95])
    assert (sft.checkpoint.every, sft.checkpoint.keep, sft.resources.trainer.threads, sft.data.truncate) == (50, 2, 0, False)
    assert pretrain.optim == Optim(lr=3e-3, schedule="cosine", warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1,
                                   grad_clip=1.0, betas=[0.9, 0.95])
    assert pretrain.checkpoint == Checkpointing(every=100, keep=1)
    assert (pretrain.resources.trainer.cpus, pretrain.resources.trainer.threads) == (2.0, 0)
    assert pretrain.resources is not PretrainConfig().resources  # each config its own section
    for cfg in (RejectionSampleConfig(), ScorecardConfig()):
        assert (cfg.resources.rollout.cpus, cfg.resources.rollout.threads, cfg.resources.reward.cpus) == (0.5, 1, 0.5)
    # a section given in part keeps the stage's defaults for the rest
    assert make_config(PretrainConfig, {"optim.lr": 1e-2}).optim.warmup_steps == 30


@pytest.mark.parametrize("override, message", [
    ("rl.resources.trainer.workers=0", "rl.resources.trainer.workers must be >= 1, got 0"),
    ("rl.resources.rollout.cpus=0", "rl.resources.rollout.cpus must be > 0"),
    ("rl.resources.trainer.threads=-1", "rl.resources.trainer.threads must be >= 0"),
    ("rl.resources.trainer.custom={node_a: -1}", "rl.resources.trainer.custom.node_a must be >= 0"),
    ("rl.resources.device=tpu", "rl.resources.device='tpu': expected cpu, cuda or cuda:N"),
    ("rl.resources.placement_timeout_s=0", "rl.resources.placement_timeout_s must be > 0"),
    ("rl.optim.lr=0", "rl.optim.lr must be a number > 0"),
    ("rl.optim.betas=[0.9,1.0]", "rl.optim.betas=[0.9, 1.0]: two numbers in [0, 1)"),
    ("rl.optim.grad_clip=0", "rl.optim.grad_clip must be > 0"),
    ("rl.checkpoint.keep=-1", "rl.checkpoint.keep must be >= 0"),
    ("rl.rollout.group_size=1", "rl.rollout.group_size must be >= 2"),
    ("rl.algorithm.kl_coef=-1", "rl.algorithm.kl_coef must be >= 0"),
    ("rl.sync.bucket_mb=0", "rl.sync.bucket_mb must be > 0"),
    ("rl.data.template=nope", "rl.data.template='nope'"),
    ("pretrain.optim.min_lr_ratio=2", "pretrain.optim.min_lr_ratio must be in [0, 1]"),
])
def test_a_bad_section_value_names_its_full_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe("r1-zero", [override])
    assert message in str(info.value)


def test_sft_checks_its_sections():
    assert load_recipe("r1", ["cold_start.resources.trainer.workers=2"]).cold_start.resources.trainer.workers == 2
    with pytest.raises(ConfigError, match=r"sft\.data\.heldout_fraction must be in \[0, 1\)"):
        load_recipe("r1", ["sft.data.heldout_fraction=1.0"])
    cfg = make_config(SFTConfig, {"resources": {"device": "cuda", "trainer": {"threads": 4}}, "data.truncate": True})
    assert (cfg.resources.device, cfg.resources.trainer.threads, cfg.data.truncate) == ("cuda", 4, True)
    with pytest.raises(ConfigError, match=r"sft\.data\.truncate"):
        make_config(SFTConfig, {"data.truncate": "sometimes"})


def test_reward_workers_take_no_gpu():
    with pytest.raises(ConfigError, match=r"rejection_sample\.resources\.reward\.gpus=1.0: reward workers run"):
        load_recipe("r1", ["rejection_sample.resources.reward.gpus=1"])


def test_the_moved_keys_table_points_at_keys_that_exist():
    for kind, table in MOVED_KEYS.items():
        cls = get_stage(kind).config_cls
        now = {key for key, _, _ in settings(cls())}
        top = {key.split(".")[0] for key in now}
        for old, new in table.items():
            assert old not in top, f"{kind}.{old} is still a key"
            for key in new:
                assert key in now, f"{kind}: {old} -> {key}, which is not a key"


def test_an_old_key_in_a_recipe_file_names_its_new_key(tmp_path):
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "r1-zero.yaml").read_text())
    recipe["rl"]["num_policy_workers"] = 2
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"^rl\.num_policy_workers: moved to rl\.resources\.trainer\.workers$"):
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("rl.lr=1e-5", "rl.lr: moved to rl.optim.lr"),
    ("rl.cpus_per_worker=1", "rl.cpus_per_worker: moved to rl.resources.trainer.cpus and rl.resources.rollout.cpus"),
    ("rl.reward_weights={accuracy: 1}", "rl.reward_weights: moved to rl.rewards.weights"),
    ("rl.engine.dtype=bfloat16", "rl.engine: moved to rl.rollout.engine"),
    ("rl.checkpoint_every=5", "rl.checkpoint_every: moved to rl.checkpoint.every"),
    ("pretrain.warmup_steps=5", "pretrain.warmup_steps: moved to pretrain.optim.warmup_steps"),
    ("pretrain.num_threads=2", "pretrain.num_threads: moved to pretrain.resources.trainer.threads"),
])
def test_an_old_key_in_an_override_names_its_new_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe("r1-zero", [override])
    assert str(info.value) == message


def test_old_keys_of_every_kind_are_refused():
    for recipe, override, message in [
        ("r1", "cold_start.train_path=x.jsonl", "cold_start.train_path: moved to cold_start.data.train_path"),
        ("r1", "sft.device=cuda", "sft.device: moved to sft.resources.device"),
        ("r1", "rejection_sample.num_rollout_workers=2", "rejection_sample.num_rollout_workers: moved to "
                                                         "rejection_sample.resources.rollout.workers"),
        ("r1", "scorecard.threads_per_worker=2", "scorecard.threads_per_worker: moved to scorecard.resources.rollout.threads"),
        ("r1", "all_rl.keep_checkpoints=1", "all_rl.keep_checkpoints: moved to all_rl.checkpoint.keep"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe, [override])
        assert str(info.value) == message


def test_the_cli_says_the_new_key_on_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1pipe.cli", "run", "r1-zero", "rl.lr=1e-5"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["r1pipe run: bad recipe: rl.lr: moved to rl.optim.lr"]


def test_dry_run_prints_the_sections(tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1pipe.cli", "run", "r1-zero", "rl.optim.lr=5e-5", "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout.rsplit("run directory:", 1)[0])
    assert printed["rl"]["optim"]["lr"] == 5e-5 and printed["rl"]["resources"]["trainer"]["workers"] == 2
    assert printed["pretrain"]["optim"]["warmup_steps"] == 30 and printed["pretrain"]["checkpoint"] == {"every": 100, "keep": 1}


def test_make_config_checks_like_a_recipe():
    cfg = make_config(GRPOConfig, {"rollout.group_size": 4, "optim": {"lr": 1e-2}, "rewards.weights": {}})
    assert (cfg.rollout.group_size, cfg.optim.lr, cfg.optim.betas, cfg.rewards.weights) == (4, 1e-2, [0.9, 0.99], {})
    with pytest.raises(ConfigError, match=r"^rl\.lr: moved to rl\.optim\.lr$"):
        make_config(GRPOConfig, {"lr": 1e-2}, "rl")
    with pytest.raises(ConfigError, match=r"rl\.rollout\.grup"):
        make_config(GRPOConfig, {"rollout.grup": 1}, "rl")


def test_workers_and_schedules():
    assert Workers().custom == {} and Workers(threads=0).threads == 0
    with pytest.raises(ValueError, match="custom.slot must be >= 0"):
        Workers(custom={"slot": -1.0})
    # constant: linear warmup, then lr; cosine: the same warmup, then down to min_ratio * lr at the last step
    assert [scheduled_lr("constant", s, 10, 2, 1.0, 0.1) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert scheduled_lr("cosine", 0, 10, 2, 1.0, 0.1) == 0.5
    assert scheduled_lr("cosine", 10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)
