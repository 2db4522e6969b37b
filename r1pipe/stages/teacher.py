"""Stage `teacher`: the checkpoint a distillation samples its traces from.

In order: `model_path` when given (any Hugging Face layout checkpoint: an r1pipe run's model, or
DeepSeek-V3/R1 weights); else the final model of the first finished run among `runs` (by default
the tiny R1 recipe's run, then R1-Zero's); else the run `recipe` is trained on the fly into
`run_dir` (re-entering it continues an interrupted one, and the pretrain stage reuses its cached
base). Outputs: model_path and where it came from (teacher_source).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from r1pipe.config import load_recipe
from r1pipe.errors import ModelError
from r1pipe.run import run_recipe
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import TeacherConfig


def final_model(run_dir: str | Path) -> Optional[Path]:
    """The model of the last stage with one, in a run whose every stage finished (DONE.json); else None."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        return None
    stages = list(OmegaConf.load(run_dir / "config.yaml").get("stages") or [])
    done = [run_dir / name / "DONE.json" for name in stages]
    if not stages or not all(d.is_file() for d in done):
        return None
    for d in reversed(done):
        path = json.loads(d.read_text()).get("model_path")
        if path and Path(path).is_dir():
            return Path(path)
    return None


def run_teacher(cfg: TeacherConfig, ctx: StageContext) -> dict:
    if cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"teacher.model_path={cfg.model_path}: not a Hugging Face layout checkpoint (no config.json)")
        return {"model_path": str(path), "teacher_source": "model_path"}
    for run in cfg.runs:
        model = final_model(run)
        if model is not None:
            print(f"teacher: the final model of the finished run {run}: {model}")
            return {"model_path": str(model), "teacher_source": str(run)}
    print(f"teacher: no finished run among {list(cfg.runs)}; training recipe {cfg.recipe!r} in {cfg.run_dir}")
    run_recipe(load_recipe(cfg.recipe, list(cfg.overrides)), cfg.run_dir)
    model = final_model(cfg.run_dir)
    if model is None:
        raise RuntimeError(f"teacher: the {cfg.recipe!r} run in {cfg.run_dir} finished without a model")
    return {"model_path": str(model), "teacher_source": f"{cfg.run_dir} (trained by this run)"}
