"""GRPO end to end on Ray (2 CPUs) with a tiny random model and a trivially learnable reward.

The task: completions are rewarded by their share of the letter "a" (a dense reward any policy
can climb). One shared run checks that reward rises, that a reward which raises on some inputs
only scores 0 and is counted, and what the run directory holds. The resume tests SIGKILL a run
after its step-2 checkpoint (the r1-zero recipe's own layout; a sharded dense policy with a KL
reference; test_grpo_async: one policy worker with a KL reference) and re-enter it: every step must
equal an uninterrupted run's, which runs in the test's process while the killed one runs in a
subprocess. A disk without room for a checkpoint stops a run before it trains.
"""
import dataclasses
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import OmegaConf

ray = pytest.importorskip("ray")

from r1pipe.config import make_config  # noqa: E402
from r1pipe.stages.base import StageContext  # noqa: E402
from r1pipe.stages.configs import GRPOConfig  # noqa: E402
from r1pipe.stages.grpo import GRPOTrainer, run_grpo  # noqa: E402
from r1pipe.tracking.checkpoints import DiskFullError  # noqa: E402
from r1pipe.tracking import read_metrics  # noqa: E402
from tiny_models import make_tiny_dense  # noqa: E402

CHARS = list("abcdefgh ?")


def share_of_a(text: str, reference: dict) -> float:
    """The learnable reward: fraction of the completion's characters that are 'a'."""
    return text.count("a") / max(len(text), 1)


def mostly_a(text: str, reference: dict) -> float:
    """'accuracy' of the toy task: 1 when most characters are 'a'."""
    return float(share_of_a(text, reference) > 0.5)


def crashes_on_b(text: str, reference: dict) -> float:
    """A broken reward: raises whenever the completion contains 'b'."""
    if "b" in text:
        raise RuntimeError("reward bug")
    return 0.0


SLOW_STEPS = "R1PIPE_TEST_SLOW_STEPS"  # set in the environment of a run that is to be killed


def slow_zero(text: str, reference: dict) -> float:
    """In a run started with SLOW_STEPS set, slows a step to about a second, so that a resume test can kill
    it between checkpoints; 0 either way (the runs compared with it take the same steps, only sooner)."""
    if os.environ.get(SLOW_STEPS):
        time.sleep(0.03)
    return 0.0


def save_char_tokenizer(path: Path) -> int:
    """A character-level tokenizer over CHARS (ids 0/1/2: pad / eos / bos) saved in `path`; returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from r1pipe.data.tokenizer import SPECIAL_TOKENS, save_tokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    save_tokenizer(tok, path)
    return len(vocab)


def make_tiny_model(path: Path, mtp_layers: int = 0) -> Path:
    """A random tiny DeepSeek-V3 (1 dense + 1 MoE layer, `mtp_layers` MTP modules) with a character-level tokenizer."""
    from r1pipe.model import ModelConfig, Transformer, save_pretrained

    vocab = range(save_char_tokenizer(path))
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), **dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                     num_nextn_predict_layers=mtp_layers, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    save_pretrained(Transformer(cfg, seed=0), path)
    return path


def write_problems(path: Path, n: int) -> Path:
    rows = [{"id": str(i), "prompt": "".join(CHARS[(i + j) % 8] for j in range(4)) + "?", "answer": "a"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module; 4 logical CPUs, so that a run killed in a subprocess and its
    uninterrupted reference (each placing up to 1.5 CPUs) are placed at once."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_task")
    return {
        "model": str(make_tiny_model(root / "model")),
        # with an MTP module, as the tiny preset's bases have: the GRPO loss never reaches it
        "mtp_model": str(make_tiny_model(root / "mtp_model", mtp_layers=1)),
        # a dense policy: transformers' Qwen2 with tied embeddings, the same tokenizer
        "qwen2": str(make_tiny_dense(root / "qwen2", "qwen2", vocab_size=save_char_tokenizer(root / "qwen2"),
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)),
        "train": str(write_problems(root / "train.jsonl", 32)),
        "heldout": str(write_problems(root / "heldout.jsonl", 8)),
    }


def grpo_config(task: dict, overrides: dict | None = None) -> GRPOConfig:
    """The toy task's config; `overrides` keyed as in a recipe section ({"rollout.group_size": 4})."""
    values = {
        "data.train_path": task["train"], "data.heldout_path": task["heldout"], "steps": 6,
        "rollout.prompts_per_step": 4, "rollout.group_size": 8, "rollout.max_tokens": 8, "rollout.temperature": 1.0,
        "rollout.stop": [], "rewards.weights": {}, "optim.lr": 1e-2, "algorithm.clip_high": 0.28,
        "rewards.extra": {f"{__name__}:share_of_a": 1.0, f"{__name__}:crashes_on_b": 0.0},
        "rewards.accuracy_reward": "mostly_a", "resources.trainer.workers": 2, "algorithm.micro_batch_size": 16,
        "checkpoint.every": 2, **(overrides or {}),
    }
    if values["rewards.accuracy_reward"] == "mostly_a":
        values["rewards.extra"] = {**values["rewards.extra"], f"{__name__}:mostly_a": 0.0}
    return make_config(GRPOConfig, values, "rl")


def context(run_dir: Path, model: str, address: str | None = None) -> StageContext:
    recipe = OmegaConf.create({"cluster": {"address": address, "num_cpus": 2}, "model": {"path": model}})
    return StageContext(run_dir=run_dir, stage_dir=run_dir / "rl", recipe=recipe, seed=0)


@pytest.fixture(scope="module")
def finished_run(ray_cluster, task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_run")
    outputs = run_grpo(grpo_config(task, {"data.eval_every": 3}), context(run_dir, task["model"]))
    rows = [json.loads(l) for l in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    return run_dir / "rl", outputs, rows


def test_reward_rises_on_a_learnable_task(finished_run):
    _, _, rows = finished_run
    reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(reward) == 6
    # random init: ~1/13 of characters are 'a'; a few updates at lr 1e-2 should clearly raise it
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.1, reward


def test_trainer_and_engine_logprobs_agree_before_the_update(finished_run):
    _, _, rows = finished_run
    for r in rows[1:]:
        assert r["logprob_mismatch/mean_abs"] < 1e-3, r


def test_crashing_reward_is_counted_not_fatal(finished_run):
    stage_dir, outputs, rows = finished_run
    assert sum(r.get("reward/errors", 0) for r in rows) > 0
    assert outputs["final_accuracy"] is not None
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert any("reward bug" in e for e in summary["reward_errors_sample"])


def test_run_directory_contents(finished_run):
    stage_dir, outputs, rows = finished_run
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert {"base_accuracy", "final_accuracy", "steps", "wall_seconds"} <= summary.keys()
    assert summary["steps"] == 6 and rows[-1]["heldout_accuracy"] == summary["final_accuracy"]
    for key in ("kl", "entropy", "clip_fraction", "grad_norm", "moe/maxvio", "tokens_per_second", "time/rollout",
                "time/reward", "time/train", "time/sync", "response_length/mean", "reward/share_of_a"):
        assert key in rows[-1], key
    assert rows[-1]["moe/maxvio"] > 0
    # held-out evaluation inside a step (eval_every 3) is timed apart, so training time can leave it out
    assert "heldout_accuracy" in rows[3] and rows[3]["time/heldout"] > 0
    assert all(r["time/heldout"] == 0.0 for r in rows[1:] if r["step"] != 3)
    assert rows[3]["time/step"] > rows[3]["time/heldout"] + rows[3]["time/train"]
    assert {p.stem for p in (stage_dir / "plots").glob("*.png")} >= {"reward", "accuracy", "response_length", "kl"}
    # the budget: every step sampled 4 prompts x 8 (dynamic sampling on, without refills: dropped groups count too),
    # each of response_length/mean tokens on average; a step that kept a group took one optimizer step
    trained = [r for r in rows[1:] if r["groups_kept"] > 0]
    budget = {"optimizer_steps": len(trained), "sampled_sequences": 6 * 32,
              "sampled_tokens": round(sum(32 * r["response_length/mean"] for r in rows[1:]))}
    assert {k: outputs[k] for k in budget} == {k: summary[k] for k in budget} == budget
    assert list((stage_dir / "tensorboard").glob("events.*"))
    model_dir = Path(outputs["model_path"])
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert (model_dir / "sharded" / ".metadata").exists() and (model_dir / "rng_rank1.pt").exists()  # DCP shards


RESUME_SCRIPT = """
import sys, json
from pathlib import Path
sys.path.insert(0, {tests!r})
import {module} as t
task = json.loads({task!r})
t.run_grpo(t.{config}(task), t.context(Path({run_dir!r}), task[{model!r}], {address!r}))
"""


def killed_and_straight(killed_run, config: Callable[[dict], GRPOConfig], task: dict, killed: Path, straight: Path,
                        address: str, step: int, model: str = "mtp_model") -> dict:
    """The stage `config(task)` names, on task[model], twice at once: in a subprocess (run dir `killed`, each
    step slowed to about a second) SIGKILLed once checkpoint `step` is complete (the next one is not), and
    uninterrupted here (run dir `straight`). Returns the uninterrupted run's outputs."""
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), module=config.__module__, task=json.dumps(task),
                                  run_dir=str(killed), address=address, config=config.__name__, model=model)
    ckpt = killed / "rl" / "checkpoints" / f"step_{step:06d}" / "trainer_state.json"
    run = killed_run([sys.executable, "-c", script], ckpt, timeout_s=240, env={SLOW_STEPS: "1"})
    outputs = run_grpo(config(task), context(straight, task[model]))
    err = run.wait()
    assert ckpt.exists(), err if run.proc.returncode != -signal.SIGKILL else "no checkpoint in time"
    assert json.loads(ckpt.read_text())["step"] == step
    assert not (killed / "rl" / "checkpoints" / f"step_{step + 2:06d}").exists()  # killed mid-run, not after it
    return outputs


def assert_same_steps(resumed: list[dict], uninterrupted: list[dict]) -> None:
    """Every metric of every step equal (wall-clock ones aside)."""
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key, value in b.items():
            if key.startswith(("time/", "tokens_per_second")):
                continue
            assert a[key] == pytest.approx(value, abs=1e-6), (key, a["step"])


def recipe_layout_config(task: dict) -> GRPOConfig:
    """The r1-zero recipe's rl section as shipped (2 replicated policy workers summing gradients in shared
    memory, 2 rollout engines, dynamic sampling, zero-advantage rows skipped, no KL) on the toy task at toy
    sizes; lr 1e-2 so that a wrongly restored optimizer shows at once."""
    from r1pipe.config import load_recipe, stage_config

    cfg = stage_config(load_recipe("r1-zero"), "rl")
    cfg.steps, cfg.checkpoint.every, cfg.optim.lr = 5, 2, 1e-2
    cfg.data = dataclasses.replace(cfg.data, train_path=task["train"], heldout_path=task["heldout"], template="raw", heldout_size=8)
    cfg.rollout = dataclasses.replace(cfg.rollout, prompts_per_step=4, max_tokens=8, stop=[])
    cfg.rewards = dataclasses.replace(cfg.rewards, weights={}, accuracy_reward="mostly_a", extra={
        f"{__name__}:share_of_a": 1.0, f"{__name__}:mostly_a": 0.0, f"{__name__}:slow_zero": 0.0})
    return cfg


def test_killed_run_in_the_recipe_layout_resumes_to_the_same_steps(ray_cluster, task, tmp_path, killed_run):
    """A run of the r1-zero recipe's layout SIGKILLed after its step-2 checkpoint and started again takes
    exactly the steps of an uninterrupted run: the three after the resume compared metric by metric."""
    layout = recipe_layout_config(task)
    assert (layout.resources.trainer.workers, layout.resources.rollout.workers, layout.parallelism.fsdp,
            layout.sync.shared_memory) == (2, 2, False, True)
    plain_out = killed_and_straight(killed_run, recipe_layout_config, task, tmp_path / "killed", tmp_path / "straight",
                                    ray_cluster, step=2)
    resumed_out = run_grpo(recipe_layout_config(task), context(tmp_path / "killed", task["mtp_model"]))
    budget = ("optimizer_steps", "sampled_tokens", "sampled_sequences")
    assert [resumed_out[k] for k in budget] == [plain_out[k] for k in budget] and plain_out["optimizer_steps"] == 5
    resumed, plain = (read_metrics(tmp_path / d / "rl" / "metrics.jsonl") for d in ("killed", "straight"))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    assert all(r["grad_norm"] > 0 for r in plain[3:])  # the steps compared train
    assert_same_steps(resumed, plain)


def dense_config(task: dict) -> GRPOConfig:
    """A Qwen2 policy FSDP2-sharded over 2 trainer workers, 1 engine, a KL reference (sharded like it)."""
    cfg = grpo_config(task, {"steps": 4, "checkpoint.every": 2, "algorithm.kl_coef": 0.01})
    cfg.rewards.extra[f"{__name__}:slow_zero"] = 0.0
    return cfg


def test_a_dense_qwen2_policy_trains_syncs_and_resumes_to_the_same_steps(ray_cluster, task, tmp_path, killed_run):
    """GRPO on transformers' Qwen2: sharded trainer group, r1pipe's engine, weight sync with the post-sync probe
    (first sync and every step), SIGKILL after the step-2 checkpoint, then the same steps as an uninterrupted run."""
    assert (dense_config(task).resources.trainer.workers, dense_config(task).parallelism.fsdp) == (2, True)
    outputs = killed_and_straight(killed_run, dense_config, task, tmp_path / "killed", tmp_path / "straight", ray_cluster,
                                  step=2, model="qwen2")
    run_grpo(dense_config(task), context(tmp_path / "killed", task["qwen2"]))
    resumed, plain = (read_metrics(tmp_path / d / "rl" / "metrics.jsonl") for d in ("killed", "straight"))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["kl"] > 0 for r in plain[2:])
    assert_same_steps(resumed, plain)
    assert json.loads((Path(outputs["model_path"]) / "config.json").read_text())["model_type"] == "qwen2"


def test_a_checkpoint_the_engine_does_not_run_is_refused_before_any_actor(task, tmp_path):
    from r1pipe.errors import ConfigError

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2.*supported model types: deepseek_v3, llama, qwen2"):
        run_grpo(grpo_config(task), context(tmp_path / "run", str(gpt2)))
    with pytest.raises(ConfigError, match="rl.rollout.routing_replay: needs r1pipe's DeepSeek-V3"):
        run_grpo(grpo_config(task, {"rollout.routing_replay": True}), context(tmp_path / "run2", task["qwen2"]))


def test_a_disk_without_room_for_a_checkpoint_stops_the_run_before_it_trains(ray_cluster, task, small_disk):
    run_dir = small_disk(2)  # a checkpoint of the toy model takes about 5 MB
    trainer = GRPOTrainer(grpo_config(task, {"steps": 2, "resources.trainer.workers": 1}), context(run_dir, task["mtp_model"]))
    try:
        checkpoints = re.escape(str(run_dir / "rl" / "checkpoints"))
        with pytest.raises(DiskFullError, match=rf"^no space left on {checkpoints}: need [4-6] MB"):
            trainer.run()
    finally:
        trainer.policy.shutdown()
        trainer.rollout.shutdown()
        trainer.placement.remove()
    assert not (run_dir / "rl" / "metrics.jsonl").exists() and not (run_dir / "rl" / "checkpoints").exists()


def test_truncated_sampling_is_refused_naming_the_key(task):
    with pytest.raises(ValueError, match=r"rl\.rollout\.top_p=0.9"):
        grpo_config(task, {"rollout.top_p": 0.9})


def test_bf16_engine_turns_on_tis_and_logs_mismatch(ray_cluster, task, tmp_path):
    cfg = grpo_config(task, {"steps": 2, "rollout.prompts_per_step": 2, "rollout.group_size": 4, "resources.trainer.workers": 1,
                             "checkpoint.every": 2, "rollout.engine": {"dtype": "bfloat16"}, "algorithm.tis_cap": 1.0})
    run_grpo(cfg, context(tmp_path, task["model"]))
    rows = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][1:]
    for r in rows:
        assert r["logprob_mismatch/mean_abs"] > 1e-4, r  # bf16 engine vs fp32 trainer
        # cap 1: every token where the engine under-rates the trainer's token is clipped
        assert 0.0 < r["tis/clipped_share"] < 1.0 and r["tis/weight_mean"] <= 1.0, r


def test_fp32_path_has_tis_off_by_default(finished_run):
    _, _, rows = finished_run
    assert not any("tis/clipped_share" in r for r in rows)


def test_two_engines_and_two_replicas_sample_and_step_as_one_of_each(ray_cluster, task, tmp_path):
    """The r1-zero recipe's layout (2 rollout workers, 2 replicated policy workers): every prompt's samples are
    seeded by its position in the stream, whichever engine draws them, and the replicas sum their gradients, so
    the run is the one-of-each run."""
    common = {"steps": 2, "rollout.prompts_per_step": 4, "rollout.group_size": 4, "checkpoint.every": 2, "sync.check_every": 1}
    runs = {}
    for n in (1, 2):
        cfg = grpo_config(task, {**common, "resources.trainer": {"workers": n, "cpus": 0.25},
                                 "resources.rollout": {"workers": n, "cpus": 0.25}, "parallelism.fsdp": False})
        run_grpo(cfg, context(tmp_path / str(n), task["model"]))
        runs[n] = [json.loads(line) for line in (tmp_path / str(n) / "rl" / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(runs[1]) == len(runs[2]) == 2
    for one, two in zip(runs[1], runs[2]):
        for key in ("reward/mean", "response_length/mean", "groups_kept", "data_position"):
            assert one[key] == two[key], key
        for key in ("loss", "grad_norm", "entropy", "sync/probe_logprob_diff"):
            assert one[key] == pytest.approx(two[key], abs=1e-5), key
