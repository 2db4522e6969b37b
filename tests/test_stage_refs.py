"""`@stage.key` references in stage configs, `run.tiny_recipe`, and the R1 world's pretrain options."""
from dataclasses import dataclass
from typing import Optional

import pytest

from omegaconf import OmegaConf

from r1pipe.config import ConfigError, load_recipe, make_config, stage_config
from r1pipe.run import resolve_stage_refs
from r1pipe.stages.configs import GRPOConfig, PretrainConfig
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.stages.pretrain import base_key, stage_model_section, write_splits
from tiny_models import make_tiny_v3


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
    with pytest.raises(ConfigError, match=r"rl.data.train_path='stage:eval.report_path': stage 'eval' runs after 'rl' \(stages before it: pretrain\)"):
        load_recipe("r1-zero", ["rl.data.train_path=stage:eval.report_path"])
    with pytest.raises(ConfigError, match=r"rl.model_path='stage:sft.model_path': the recipe has no stage 'sft'"):
        load_recipe("r1-zero", ["rl.model_path=stage:sft.model_path"])
    with pytest.raises(ConfigError, match=r"eval.model_path='stage:rl.model_path': 'rl' is not a stage listed before 'eval'"):
        load_recipe("r1-zero", ["stages=[pretrain,eval]", "eval.model_path=stage:rl.model_path"])
    ok = load_recipe("r1-zero", ["rl.data.train_path=stage:pretrain.train_path"])
    assert ok.rl.data.train_path == "stage:pretrain.train_path"  # resolved by the runner, once pretrain has run


def test_refs_inside_a_section_resolve_and_name_their_key() -> None:
    cfg = make_config(GRPOConfig, {"data.train_path": "stage:pretrain.train_path", "model_path": "stage:pretrain.model_path"})
    cfg = resolve_stage_refs(cfg, {"pretrain": {"train_path": "/r/p/train.jsonl", "model_path": "/r/p/model"}}, "rl")
    assert (cfg.data.train_path, cfg.model_path) == ("/r/p/train.jsonl", "/r/p/model")
    cfg = make_config(GRPOConfig, {"data.heldout_path": "stage:pretrain.heldout_path"})
    with pytest.raises(ConfigError, match=r"rl.data.heldout_path='stage:pretrain.heldout_path': stage 'pretrain' has no output"):
        resolve_stage_refs(cfg, {"pretrain": {"model_path": "/m"}}, "rl")


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
    # the R1-Zero tiny base's key (the R1-world options at their defaults do not enter it)
    assert base_key(PretrainConfig(), {"preset": "tiny"}, 0) == "1b11c63b6c79160c"
    assert base_key(PretrainConfig(world="r1"), {"preset": "tiny"}, 0) != "1b11c63b6c79160c"
    with pytest.raises(ValueError, match="mix_fraction: only used with world=r1"):
        PretrainConfig(mix_fraction=0.2)
    with pytest.raises(ValueError, match="code_train_size >= 1"):
        PretrainConfig(world="r1", code_fraction=0.2)


@pytest.mark.parametrize("recipe, stage, key", [
    ("r1-zero", "pretrain", "b4311a9b6c087adf"),
    ("r1", "pretrain", "113331ce716fd337"),  # 1024 math + 256 code held-out
    ("r1-zero-tiny", "pretrain", "e8f35aacdb910f8d"),
    # 450 steps, validation problems, the teacher's splits; the V3 student's key without the teacher's tokenizer,
    # which enters by its content (test_valid_size_and_tokenizer_path_enter_the_key_only_when_set)
    ("distill", "v3_base", "5637ba2f1e259c35"),
    ("distill", "qwen_base", "87ca149cf2c876bf"),
])
def test_the_shipped_bases_keep_their_keys(recipe, stage, key) -> None:
    """The shipped recipes' base keys (pinned: a change to what enters the key must change them on purpose; they
    changed when the bases moved to the trainer group, not with the optim section)."""
    cfg = load_recipe(recipe, [f"{stage}.tokenizer_path=null"])
    pretrain = stage_config(cfg, stage)
    assert base_key(pretrain, stage_model_section(pretrain, OmegaConf.to_container(cfg.model)), 0) == key


def test_valid_size_and_tokenizer_path_enter_the_key_only_when_set(tmp_path) -> None:
    """valid_size 0 and no tokenizer_path leave the R1-Zero base's key; a given tokenizer keys the base by its
    content (a copy elsewhere gives the same key, another vocabulary another key), and vocab_size then not at all."""
    assert base_key(PretrainConfig(valid_size=0), {"preset": "tiny"}, 0) == "1b11c63b6c79160c"
    assert base_key(PretrainConfig(valid_size=64), {"preset": "tiny"}, 0) != "1b11c63b6c79160c"
    teacher = make_tiny_v3(tmp_path / "teacher", vocab_size=400)
    load_tokenizer(teacher).save_pretrained(str(tmp_path / "copy"))
    other = make_tiny_v3(tmp_path / "other", vocab_size=300)
    keys = {path: base_key(PretrainConfig(tokenizer_path=str(path)), {"preset": "tiny"}, 0)
            for path in (teacher, tmp_path / "copy", other)}
    assert keys[teacher] == keys[tmp_path / "copy"] != keys[other] and "1b11c63b6c79160c" not in keys.values()
    assert base_key(PretrainConfig(tokenizer_path=str(teacher), vocab_size=99), {"preset": "tiny"}, 0) == keys[teacher]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"tokenizer_path=.*empty: no tokenizer files"):
        base_key(PretrainConfig(tokenizer_path=str(tmp_path / "empty")), {"preset": "tiny"}, 0)
    with pytest.raises(ValueError, match="valid_size=-1"):
        PretrainConfig(valid_size=-1)


def test_split_seed_fixes_the_problems_across_run_seeds(tmp_path) -> None:
    """split_seed unset keeps the key and draws the splits from run.seed; set, run seeds 0 and 1 write the same
    held-out, train and validation files (the corpus and the model still follow run.seed: the key differs)."""
    assert base_key(PretrainConfig(split_seed=None), {"preset": "tiny"}, 0) == "1b11c63b6c79160c"
    fixed = PretrainConfig(split_seed=0, heldout_size=16, train_size=32, valid_size=8, eval_size=16)
    assert base_key(fixed, {"preset": "tiny"}, 0) != base_key(fixed, {"preset": "tiny"}, 1)
    for seed in (0, 1):
        (tmp_path / f"fixed{seed}").mkdir()
        write_splits(fixed, seed, tmp_path / f"fixed{seed}")
        (tmp_path / f"own{seed}").mkdir()
        write_splits(PretrainConfig(heldout_size=16, train_size=32, valid_size=8, eval_size=16), seed, tmp_path / f"own{seed}")
    for name in ("heldout.jsonl", "train.jsonl", "valid.jsonl"):
        assert (tmp_path / "fixed0" / name).read_text() == (tmp_path / "fixed1" / name).read_text()
        assert (tmp_path / "fixed0" / name).read_text() == (tmp_path / "own0" / name).read_text()
        assert (tmp_path / "own0" / name).read_text() != (tmp_path / "own1" / name).read_text()


def test_a_pretrain_stage_takes_its_tokenizer_from_an_earlier_stage() -> None:
    """`tokenizer_path: stage:teacher.model_path` is a reference like any other: checked at load, resolved at run."""
    cfg = load_recipe("distill", ["v3_base.tokenizer_path=stage:teacher.model_path"])
    pretrain = resolve_stage_refs(stage_config(cfg, "v3_base"), {"teacher": {"model_path": "/t/model"}}, "v3_base")
    assert pretrain.tokenizer_path == "/t/model"
    with pytest.raises(ConfigError, match=r"v3_base.tokenizer_path='stage:traces.model_path': stage 'traces' runs after"):
        load_recipe("distill", ["v3_base.tokenizer_path=stage:traces.model_path"])


def test_what_shapes_the_base_changes_its_key_and_what_does_not_leaves_it() -> None:
    default = base_key(PretrainConfig(), {"preset": "tiny"}, 0)
    for values in ({"optim.lr": 1e-3}, {"optim.schedule": "constant"}, {"optim.betas": [0.9, 0.99]}, {"steps": 10}):
        assert base_key(make_config(PretrainConfig, values), {"preset": "tiny"}, 0) != default, values
    for values in ({"checkpoint.every": 7}, {"resources.trainer.threads": 2}, {"eval_size": 8}):
        assert base_key(make_config(PretrainConfig, values), {"preset": "tiny"}, 0) == default, values
