"""Recipes: loading, overrides, errors that name the key, the stage registry and the runner."""
from __future__ import annotations

import ast
import inspect
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from r1pipe.config import ConfigError, find_recipe, load_recipe, recipe_names, stage_config
from r1pipe.engine import LLM
from r1pipe.engine.vllm_backend import VLLMEngine
from r1pipe.stages import BUILTIN_STAGES, StageConfig, StageContext, get_stage, register_stage
from r1pipe.stages.base import load_object
from r1pipe.stages.configs import ENGINE_OPTIONS

CALLS: list[str] = []


@dataclass
class EchoConfig(StageConfig):
    kind: str = "test_echo"
    value: int = 1
    label: str = "x"
    model_path: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"value={self.value}: must be >= 0")


@register_stage("test_echo", EchoConfig)
def echo_stage(cfg: EchoConfig, ctx: StageContext) -> dict:
    CALLS.append(ctx.stage_dir.name)
    (ctx.stage_dir / "work.txt").write_text(str(cfg.value))
    out = {"value": cfg.value, "seen": sorted(ctx.outputs), "upstream_model": str(ctx.model_path()) if ctx.outputs or ctx.recipe.model.path else None}
    if cfg.model_path:
        out["model_path"] = cfg.model_path
    return out


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


ECHO = """
run: {name: echo, seed: 7}
model: {path: /base}
stages: [first, second]
first: {kind: test_echo, value: 2, model_path: /from-first}
second: {kind: test_echo, label: two}
"""


def test_shipped_recipes_resolve():
    assert {"r1-zero", "r1-zero-tiny"} <= set(recipe_names())
    for name in ("r1-zero", "r1-zero-tiny"):
        cfg = load_recipe(name)
        assert list(cfg.stages) == ["pretrain", "rl", "eval"]
        assert cfg.pretrain.kind == "pretrain" and cfg.rl.kind == "grpo" and cfg.eval.kind == "eval"
        assert type(stage_config(cfg, "pretrain")).__name__ == "PretrainConfig"
    assert find_recipe("r1-zero").name == "r1-zero.yaml"


def test_overrides_are_typed_and_applied():
    cfg = load_recipe("r1-zero-tiny", ["pretrain.steps=7", "run.name=x", "model.overrides.hidden_size=32", "stages=[pretrain]"])
    assert cfg.pretrain.steps == 7 and isinstance(cfg.pretrain.steps, int)
    assert cfg.run.name == "x" and cfg.model.overrides.hidden_size == 32 and list(cfg.stages) == ["pretrain"]
    assert stage_config(cfg, "pretrain").steps == 7
    with pytest.raises(Exception):  # resolved recipes are read-only
        cfg.pretrain.steps = 3


@pytest.mark.parametrize("override, names", [
    ("pretrain.stepz=5", "pretrain.stepz"),
    ("pretrain.steps=abc", "pretrain.steps"),
    ("pretrain.worked_fraction=1.5", "worked_fraction"),
    ("pretrain.problem_kinds=[add,div]", "problem_kinds"),
    ("runn.name=x", "runn"),
    ("run.seed=zero", "run.seed"),
    ("cluster.adress=auto", "cluster.adress"),
    ("eval.kind=nope", "eval.kind"),
    ("stages=[pretrain,train]", "train"),
    ("pretrain.steps", "pretrain.steps"),
    ("rl.algorithm.loss=ppo", "rl.algorithm.loss='ppo'"),
    ("rl.algorithm.advantage=gae", "rl.algorithm.advantage='gae'"),
    ("rl.rollout.engine.cuda_graphz=true", "rl.rollout.engine.cuda_graphz"),
    ("rl.rollout.engine.cuda_graphs=3", "rl.rollout.engine.cuda_graphs"),
    ("rl.rollout.engine.fp8=fast", "rl.rollout.engine.fp8"),
    ("rl.rollout.engine.dtype=bf17", "rl.rollout.engine.dtype"),
    ("rl.optim.betas=[0.9]", "rl.optim.betas"),
    ("rl.resources.rollout.workers=0", "rl.resources.rollout.workers"),
    ("rl.checkpoint.every=0", "rl.checkpoint.every"),
    ("pretrain.optim.schedule=linear", "pretrain.optim.schedule='linear'"),
])
def test_bad_overrides_name_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        load_recipe("r1-zero-tiny", [override])
    assert names in str(info.value)


def test_engine_options_are_llm_keywords_and_fp8_keeps_tis_on():
    assert set(ENGINE_OPTIONS) <= set(inspect.signature(LLM).parameters)  # every option reaches the engine
    rl = stage_config(load_recipe("r1-zero-tiny", ["rl.rollout.engine.fp8=true", "rl.rollout.engine.cuda_graphs=false"]), "rl")
    assert rl.rollout.engine == {"fp8": True, "cuda_graphs": False}
    with pytest.raises(ConfigError, match="rl.algorithm.tis: false with rollout.engine.fp8"):
        load_recipe("r1-zero-tiny", ["rl.rollout.engine.fp8=true", "rl.algorithm.tis=false"])


def test_rollout_backend_is_checked_where_it_is_set():
    """rl.rollout.backend and rejection_sample.backend take engine or vllm; with vllm, the rollout settings vLLM
    cannot honour in GRPO are refused naming their keys; every engine option has a vLLM meaning."""
    assert set(ENGINE_OPTIONS) <= set(inspect.signature(VLLMEngine).parameters)
    assert stage_config(load_recipe("r1-zero-tiny"), "rl").rollout.backend == "engine"
    assert stage_config(load_recipe("r1-zero-tiny", ["rl.rollout.backend=vllm"]), "rl").rollout.backend == "vllm"
    assert stage_config(load_recipe("r1-tiny", ["rejection_sample.backend=vllm"]), "rejection_sample").backend == "vllm"
    for recipe, overrides, names in [
        ("r1-zero-tiny", ["rl.rollout.backend=sglang"], "rl.rollout.backend='sglang': choose one of engine, vllm"),
        ("r1-tiny", ["rejection_sample.backend=hf"], "rejection_sample.backend='hf': choose one of engine, vllm"),
        ("r1-zero-tiny", ["rl.rollout.backend=vllm", "rl.rollout.routing_replay=true"], "rl.rollout.routing_replay needs"),
        ("r1-zero-tiny", ["rl.rollout.backend=vllm", "rl.rollout.engine.speculative_k=2"], "rl.rollout.engine.speculative_k > 0"),
        ("r1-zero-tiny", ["rl.rollout.backend=vllm", "rl.rollout.engine.fp8=true"], "rl.rollout.engine.fp8 with backend: vllm"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe, overrides)
        assert names in str(info.value)


def test_misspelt_key_in_the_file_is_named(tmp_path):
    path = write_recipe(tmp_path, ECHO.replace("label: two", "lable: two"))
    with pytest.raises(ConfigError, match=r"second\.lable"):
        load_recipe(path)
    path = write_recipe(tmp_path, ECHO + "extra: 3\n")
    with pytest.raises(ConfigError, match="extra: unknown top-level key"):
        load_recipe(path)
    path = write_recipe(tmp_path, ECHO.replace("value: 2", "value: -1"))
    with pytest.raises(ConfigError, match=r"first\.value=-1"):
        load_recipe(path)
    path = write_recipe(tmp_path, ECHO.replace("stages: [first, second]", "stages: [first, first]"))
    with pytest.raises(ConfigError, match="listed twice"):
        load_recipe(path)


def test_unknown_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="r1-zero-tiny"):
        load_recipe("r1-zeroo")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_registry():
    assert get_stage("test_echo").config_cls is EchoConfig
    assert get_stage("test_echo").fn is echo_stage
    assert get_stage("pretrain").config_cls.__name__ == "PretrainConfig"
    with pytest.raises(KeyError, match=r"unknown stage kind 'nope'; known kinds: \[.*'rejection_sample'"):
        get_stage("nope")
    with pytest.raises(TypeError, match="dataclass with a `kind`"):
        register_stage("bad", dict)


def test_every_builtin_kind_resolves_to_its_stage_function():
    for kind, (config_cls, target) in BUILTIN_STAGES.items():
        spec = get_stage(kind)
        assert spec.config_cls is config_cls and config_cls.__module__ == "r1pipe.stages.configs"
        module, _, name = target.partition(":")
        assert spec.fn is getattr(importlib.import_module(module), name) and callable(spec.fn)
    with pytest.raises(ValueError, match="module r1pipe.stages.grpo has no 'nope'"):
        load_object("r1pipe.stages.grpo:nope", "stage 'x'")


def test_validating_every_recipe_imports_no_heavy_module():
    """Recipes are checked against the stage configs (and their sections) alone: no torch, Ray,
    transformers or datasets, and no stage module (those import them at the top)."""
    code = ("import sys\n"
            "from r1pipe.config import load_recipe, recipe_names\n"
            "for name in recipe_names(): load_recipe(name)\n"
            "heavy = ['torch', 'ray', 'transformers', 'datasets', 'sympy', 'math_verify']\n"
            "heavy += [m for m in sys.modules if m.startswith('r1pipe.stages.') and m.rsplit('.', 1)[1] not in ('base', 'configs', 'sections')]\n"
            "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_stage_modules_import_at_the_top():
    """Stage modules are only imported to run a stage, so they import what they need at module level."""
    stages_dir = Path(importlib.import_module("r1pipe.stages").__file__).parent
    pushed = []
    for path in sorted(stages_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                pushed += [f"{path.name}:{n.lineno}" for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert pushed == []


def test_runner_runs_in_order_then_skips_done_stages(tmp_path, capsys):
    from r1pipe.run import run_recipe

    cfg = load_recipe(write_recipe(tmp_path, ECHO))
    CALLS.clear()
    outputs = run_recipe(cfg, tmp_path / "run")
    assert CALLS == ["first", "second"]
    assert outputs["first"] == {"value": 2, "seen": [], "upstream_model": "/base", "model_path": "/from-first"}
    # the second stage sees the first's outputs, and its newest model_path
    assert outputs["second"] == {"value": 1, "seen": ["first"], "upstream_model": "/from-first"}
    assert json.loads((tmp_path / "run" / "second" / "DONE.json").read_text()) == outputs["second"]
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == cfg

    (tmp_path / "run" / "second" / "DONE.json").unlink()  # as if killed during the second stage
    CALLS.clear()
    again = run_recipe(cfg, tmp_path / "run")
    assert CALLS == ["second"] and again == outputs


def test_model_path_falls_back_to_the_recipe(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, ECHO))
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", recipe=cfg, seed=0)
    assert ctx.model_path() == Path("/base")
    ctx.outputs = {"a": {"model_path": "/a"}, "b": {"report": 1}, "c": {"model_path": "/c", "heldout_path": "/h"}}
    assert ctx.model_path() == Path("/c") and ctx.output("heldout_path") == "/h" and ctx.output("nothing") is None
    cfg = load_recipe(write_recipe(tmp_path, ECHO.replace("model: {path: /base}", "model: {}")))
    with pytest.raises(ValueError, match="model.path"):
        StageContext(run_dir=tmp_path, stage_dir=tmp_path, recipe=cfg, seed=0).model_path()


def test_cli_dry_run_and_bad_key(tmp_path, capsys, monkeypatch):
    from r1pipe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "r1-zero", "pretrain.steps=11", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "steps: 11" in out and "runs/r1-zero" in out
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing
    assert main(["run", "r1-zero", "rl.grup_size=16"]) == 2
    assert "rl.grup_size" in capsys.readouterr().err  # errors go to stderr
