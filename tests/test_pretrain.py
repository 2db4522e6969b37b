"""The pretrain stage: schedule, data order, the generation loop, outputs, resume and the cache (the tiny
recipe from pretrain through eval is test_r1zero_tiny's)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from r1pipe.config import load_recipe, make_config
from r1pipe.data.jsonl import read_jsonl
from r1pipe.data.templates import r1_zero_prompt
from r1pipe.errors import ConfigError
from r1pipe.run import run_recipe
from r1pipe.stages.configs import PretrainConfig
from r1pipe.stages.pretrain import run_pretrain, train_base
from r1pipe.stages.supervised import Schedule

pytestmark = pytest.mark.usefixtures("ray_cluster")  # a 2-CPU Ray cluster for the module (conftest)

SMALL_MODEL = {"preset": "tiny", "path": None, "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                                               "moe_intermediate_size": 32}, "fp8": False, "dtype": "float32"}


def small_cfg(**kw) -> PretrainConfig:
    base = {**dict(max_digits=2, train_size=40, heldout_size=24, vocab_size=400, tokenizer_examples=1500, steps=8, batch_size=8,
                   eval_size=8, eval_max_tokens=20, cache_dir=None), "optim.warmup_steps": 2, "checkpoint.every": 4}
    base.update(kw)
    return make_config(PretrainConfig, base)


def test_lr_schedule_hand_values():
    cfg = make_config(PretrainConfig, {"optim": {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}, "steps": 110})
    schedule = Schedule(cfg.optim, cfg.steps)
    assert schedule.at(0) == pytest.approx(0.1)
    assert schedule.at(9) == pytest.approx(1.0)
    assert schedule.at(10) == pytest.approx(1.0)
    assert schedule.at(60) == pytest.approx(0.55)  # half-way down the cosine: 0.1 + 0.9 * 0.5
    assert schedule.at(110) == pytest.approx(0.1)


def test_config_checks():
    with pytest.raises(ValueError, match="problem_kinds"):
        PretrainConfig(problem_kinds=["div"])
    with pytest.raises(ValueError, match="eval_size"):
        PretrainConfig(eval_size=10, heldout_size=5)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train_base(small_cfg(), SMALL_MODEL, 0, out)
    return out


def test_outputs(straight_run):
    from transformers import AutoTokenizer

    from r1pipe.data.synthetic import corpus_texts
    from r1pipe.model import load_pretrained

    model_dir = straight_run / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == tok.eos_token_id and config["num_hidden_layers"] == 2
    model = load_pretrained(model_dir)
    assert model(torch.tensor([tok("What is 1 + 2?").input_ids])).logits.shape[-1] == len(tok)

    heldout, train = read_jsonl(straight_run / "heldout.jsonl"), read_jsonl(straight_run / "train.jsonl")
    assert len(heldout) == 24 and len(train) == 40
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert all(set(r) >= {"id", "prompt", "answer"} and r["prompt"].endswith("Assistant:") for r in heldout)
    # the corpus never shows a held-out or train problem (same generator call as train_base)
    from r1pipe.data.synthetic import make_splits

    cfg = small_cfg()
    h, t = make_splits(0, cfg.problem_kinds, cfg.max_digits, cfg.heldout_size, cfg.train_size)
    corpus = corpus_texts(max(cfg.steps * cfg.batch_size, cfg.tokenizer_examples), 1, cfg.problem_kinds, cfg.max_digits,
                          cfg.worked_fraction, cfg.guess_correct, set(h) | set(t), cfg.tutor_fraction)
    assert not {r["prompt"] for r in heldout + train} & {p for p, _ in corpus}

    report = json.loads((straight_run / "base_eval.json").read_text())
    for key in ("base_accuracy_greedy", "base_accuracy_sampled", "base_worked_fraction_sampled", "final_loss"):
        assert key in report
    assert 0.0 <= report["base_accuracy_sampled"] <= 1.0 and math.isfinite(report["final_loss"])
    assert not (straight_run / "checkpoints").exists() and not (straight_run / "init").exists()


def test_measuring_a_base_keeps_the_driver_thread_count(straight_run):
    """The base's check runs on a generation group; a run's later stages (SFT) must find the driver's threads
    as they were (a check that ran the engine in the driver once left 1 behind, and a fresh `r1pipe run r1`
    trained its SFT stages on one core)."""
    from r1pipe.stages.base_eval import measure_accuracy

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure_accuracy(straight_run / "model", read_jsonl(straight_run / "heldout.jsonl")[:4], 0.0, 8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


RECIPE_ARGS = ["r1-zero-tiny", "stages=[pretrain]", "pretrain.steps=12", "pretrain.checkpoint.every=3",
               "pretrain.batch_size=8", "pretrain.tokenizer_examples=1500", "pretrain.eval_size=0", "pretrain.cache_dir=null",
               "pretrain.heldout_size=24", "pretrain.train_size=40", "pretrain.vocab_size=400", "cluster.num_cpus=2",
               "model.overrides.num_hidden_layers=2", "model.overrides.hidden_size=64"]


def command(run_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r1pipe.cli", "run", *RECIPE_ARGS, *extra, "--run-dir", str(run_dir)]


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # the recipes' layout: 1 worker
def test_sigkill_then_same_command_resumes_to_the_same_weights(tmp_path, workers, killed_run):
    """SIGKILL after the step-6 checkpoint, then the same command: it resumes after step 6 (each step logged once)
    and ends on the uninterrupted run's weights (the same recipe run here meanwhile), with 1 worker and with 2
    FSDP2 workers."""
    from r1pipe.model import load_pretrained

    layout = [f"pretrain.resources.trainer.workers={workers}", f"pretrain.resources.trainer.cpus={2 // workers}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ckpt = killed / "pretrain" / "checkpoints" / "step_000006" / "trainer_state.json"
    run = killed_run(command(killed, *layout), ckpt)
    run_recipe(load_recipe(RECIPE_ARGS[0], [*RECIPE_ARGS[1:], *layout]), straight)
    err = run.wait()
    assert ckpt.exists() and not (killed / "pretrain" / "DONE.json").exists(), err
    again = subprocess.Popen(command(killed, *layout), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-2000:]
    steps = [json.loads(line)["step"] for line in (killed / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the restart began after a checkpoint, not at 0, and repeated no step

    a = load_pretrained(straight / "pretrain" / "model").state_dict()
    b = load_pretrained(killed / "pretrain" / "model").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def run_twice_with_cache(cfg, finished: Path, tmp_path, monkeypatch):
    """Two runs of the stage with one cache, training faked by copying the `finished` base: (first outputs,
    second outputs, the stage folders trained, the recipe)."""
    import r1pipe.stages.pretrain as pretrain
    from r1pipe.stages import StageContext

    recipe = load_recipe("r1-zero-tiny", ["model.overrides.hidden_size=64"])
    trained = []

    def fake_train(cfg_, model_section, seed, stage_dir, recipe=None):  # stands in for training: copy a finished base
        trained.append(stage_dir)
        pretrain._copy_outputs(finished, stage_dir)

    monkeypatch.setattr(pretrain, "train_base", fake_train)
    first = run_pretrain(cfg, StageContext(tmp_path / "r1", tmp_path / "r1" / "pretrain", recipe, 0))
    second = run_pretrain(cfg, StageContext(tmp_path / "r2", tmp_path / "r2" / "pretrain", recipe, 0))
    return first, second, trained, recipe


def test_stage_reuses_a_cached_base(straight_run, tmp_path, monkeypatch):
    from r1pipe.stages import StageContext

    cfg = replace(small_cfg(), cache_dir=str(tmp_path / "cache"))
    first, second, trained, recipe = run_twice_with_cache(cfg, straight_run, tmp_path, monkeypatch)
    assert len(trained) == 1  # the second run copied the cached base instead of training
    assert first["base_key"] == second["base_key"]
    assert (tmp_path / "r2" / "pretrain" / "model" / "tokenizer.json").exists()
    assert second["model_path"] == str(tmp_path / "r2" / "pretrain" / "model")
    assert second["base_accuracy_greedy"] == first["base_accuracy_greedy"]
    third = run_pretrain(cfg, StageContext(tmp_path / "r3", tmp_path / "r3" / "pretrain", recipe, 1))  # another seed
    assert len(trained) == 2 and third["base_key"] != first["base_key"]


@pytest.fixture(scope="module")
def given_tokenizer_run(straight_run, tmp_path_factory):
    """small_cfg with 6 validation problems and the straight run's tokenizer given as is (2 steps, no base check)."""
    out = tmp_path_factory.mktemp("given_tokenizer")
    cfg = small_cfg(valid_size=6, tokenizer_path=str(straight_run / "model"), vocab_size=50, steps=2, eval_size=0)
    train_base(cfg, SMALL_MODEL, 0, out)
    return cfg, out


def test_validation_problems_are_apart_from_train_heldout_and_corpus(straight_run, given_tokenizer_run):
    from r1pipe.data.synthetic import corpus_texts, draw_splits

    cfg, out = given_tokenizer_run
    for name in ("heldout.jsonl", "train.jsonl"):  # as without validation problems
        assert (out / name).read_bytes() == (straight_run / name).read_bytes()
    assert not (straight_run / "valid.jsonl").exists()
    valid = read_jsonl(out / "valid.jsonl")
    assert [r["id"] for r in valid] == [f"valid-{i}" for i in range(6)]
    others = {r["prompt"] for r in read_jsonl(out / "heldout.jsonl") + read_jsonl(out / "train.jsonl")}
    assert len({r["prompt"] for r in valid}) == 6 and not {r["prompt"] for r in valid} & others
    h, t, v = draw_splits(0, cfg.problem_kinds, cfg.max_digits, (cfg.heldout_size, cfg.train_size, cfg.valid_size))
    assert [r["prompt"] for r in valid] == [r1_zero_prompt(p.question) for p in v]
    corpus = corpus_texts(cfg.tokenizer_examples, 1, cfg.problem_kinds, cfg.max_digits, cfg.worked_fraction,
                          cfg.guess_correct, set(h) | set(t) | set(v), cfg.tutor_fraction)  # train_base's call
    assert not {r["prompt"] for r in valid} & {p for p, _ in corpus}


def test_a_given_tokenizer_is_the_bases_own(straight_run, given_tokenizer_run):
    from r1pipe.data.tokenizer import load_tokenizer, tokenizer_digest

    _, out = given_tokenizer_run
    given, base = load_tokenizer(straight_run / "model"), load_tokenizer(out / "model")
    assert base.get_vocab() == given.get_vocab() and tokenizer_digest(base) == tokenizer_digest(given)
    assert (base.eos_token_id, base.pad_token_id, base.bos_token_id) == (given.eos_token_id, given.pad_token_id, given.bos_token_id)
    text = r1_zero_prompt("What is 47 + 38?") + " <think> 7+8=15 5 ; 4+3+1=8 85 </think> <answer> 85 </answer>"
    assert base(text, add_special_tokens=False).input_ids == given(text, add_special_tokens=False).input_ids
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["vocab_size"] == len(given) and config["vocab_size"] != 50  # vocab_size is not used


def test_a_cached_base_brings_its_validation_problems(given_tokenizer_run, tmp_path, monkeypatch):
    from r1pipe.stages import StageContext

    cfg, out = given_tokenizer_run
    cfg = replace(cfg, cache_dir=str(tmp_path / "cache"))
    first, second, trained, recipe = run_twice_with_cache(cfg, out, tmp_path, monkeypatch)
    assert len(trained) == 1 and first["base_key"] == second["base_key"]
    assert second["valid_path"] == str(tmp_path / "r2" / "pretrain" / "valid.jsonl")
    assert Path(second["valid_path"]).read_bytes() == (out / "valid.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"pretrain.tokenizer_path=.*nowhere: no such directory"):
        run_pretrain(replace(cfg, tokenizer_path=str(tmp_path / "nowhere")),
                     StageContext(tmp_path / "r3", tmp_path / "r3" / "pretrain", recipe, 0))
