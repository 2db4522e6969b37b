"""`@stage.key` references in stage configs, `run.tiny_recipe`, and the R1 world's pretrain options."""
from dataclasses import dataclass
from typing import Optional

import pytest

from r1pipe.config import ConfigError, load_recipe
from r1pipe.run import resolve_stage_refs
from r1pipe.stages.configs import PretrainConfig
from r1pipe.stages.pretrain import base_key


@dataclass
class Cfg:
    kind: str = "x"
    train_path: Optional[str] = None
    model_path: Optional[str] = None
    note: str = "stage: not a ref"


def test_refs_resolve_to_earlier_outputs() -> None:
    outputs = {"pretrain": {"mixed_train_path": "/r/p/mixed.jsonl", "model_path": "/r/p/model"}}
    cfg = resolve_stage_refs(Cfg(train_path="stage:pretrain.mixed_train_path", model_path="stage:pretrain.model_path"), outputs, "rl")
    assert (cfg.train_path, cfg.model_path, cfg.note) == ("/r/p/mixed.jsonl", "/r/p/model", "stage: not a ref")


def test_bad_refs_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"rl.train_path='stage:sft.sft_path': stage 'sft' has not run before 'rl'"):
        resolve_stage_refs(Cfg(train_path="stage:sft.sft_path"), {"pretrain": {}}, "rl")
    with pytest.raises(ConfigError, match=r"stage 'pretrain' has no output 'code_path' \(its outputs: model_path\)"):
        resolve_stage_refs(Cfg(train_path="stage:pretrain.code_path"), {"pretrain": {"model_path": "/m"}}, "rl")


def test_refs_to_stages_not_listed_before_fail_at_load(tmp_path) -> None:
    """The runner would only meet these after the earlier stages ran; load_recipe (and --dry-run) refuses them."""
    with pytest.raises(ConfigError, match=r"rl.train_path='stage:eval.report_path': stage 'eval' runs after 'rl' \(stages before it: pretrain\)"):
        load_recipe("r1-zero", ["rl.train_path=stage:eval.report_path"])
    with pytest.raises(ConfigError, match=r"rl.model_path='stage:sft.model_path': the recipe has no stage 'sft'"):
        load_recipe("r1-zero", ["rl.model_path=stage:sft.model_path"])
    with pytest.raises(ConfigError, match=r"eval.model_path='stage:rl.model_path': 'rl' is not a stage listed before 'eval'"):
        load_recipe("r1-zero", ["stages=[pretrain,eval]", "eval.model_path=stage:rl.model_path"])
    ok = load_recipe("r1-zero", ["rl.train_path=stage:pretrain.train_path"])
    assert ok.rl.train_path == "stage:pretrain.train_path"  # resolved by the runner, once pretrain has run


def test_tiny_recipe_applies_without_a_model(tmp_path) -> None:
    tiny = load_recipe("r1", ["all_rl.steps=3"])
    assert "pretrain" in tiny.stages and tiny.all_rl.steps == 3 and tiny.model.path is None
    real = load_recipe("r1", ["model.path=/ckpt", "all_rl.steps=3"])
    assert "pretrain" not in real.stages and real.sft.model_path == "/ckpt" and real.all_rl.steps == 3
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"run: {{tiny_recipe: {loop}}}\nstages: []\n")
    with pytest.raises(ConfigError, match="names the recipe itself"):
        load_recipe(loop)


def test_r1_world_options_keep_the_r1_zero_base_key() -> None:
    # the key the R1-Zero tiny base had before the R1-world options existed
    assert base_key(PretrainConfig(), {"preset": "tiny"}, 0) == "112be2e20f5ca3b5"
    assert base_key(PretrainConfig(world="r1"), {"preset": "tiny"}, 0) != "112be2e20f5ca3b5"
    with pytest.raises(ValueError, match="mix_fraction: only used with world=r1"):
        PretrainConfig(mix_fraction=0.2)
    with pytest.raises(ValueError, match="code_train_size >= 1"):
        PretrainConfig(world="r1", code_fraction=0.2)
