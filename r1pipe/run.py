"""`r1pipe run RECIPE [key=value ...] [--dry-run] [--run-dir DIR]`: run a recipe's stages in order.

The run directory (default <run.out_dir>/<run.name>, relative to where the command runs) holds
config.yaml (the resolved recipe) and one folder per stage. A stage that finished wrote
DONE.json with its outputs and is skipped on re-run; an interrupted stage is re-entered and
resumes from its own last checkpoint. So re-running the same command continues a killed run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from r1pipe.cluster import check_cluster
from r1pipe.config import STAGE_REF, ConfigError, load_recipe, recipe_names, settings, stage_config, to_yaml
from r1pipe.errors import ModelError
from r1pipe.model_dir import checkpoint_dir_error, tokenizer_dir_error
from r1pipe.stages import StageContext, get_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"a shipped recipe ({', '.join(recipe_names())}) or a path to a recipe .yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dot-list overrides, e.g. rl.rollout.group_size=16 model.path=/ckpt")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--run-dir", default=None, help="run directory (default: <run.out_dir>/<run.name>)")


def run_dir_for(cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir) if run_dir else Path(cfg.run.out_dir) / cfg.run.name


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def run_recipe(cfg: DictConfig, run_dir: str | Path, console=None) -> dict[str, dict]:
    """Run (or continue) every stage of a resolved recipe in `run_dir`; returns outputs by stage."""
    console = console or Console()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if saved.exists() and saved.read_text() != text:
        previous = saved.with_name(f"config.{int(time.time())}.yaml")
        saved.rename(previous)
        console.print(f"[yellow]the recipe differs from this run's earlier one (kept as {previous.name}); "
                      "finished stages are not re-run[/yellow]")
    saved.write_text(text)

    outputs: dict[str, dict] = {}
    timings: list[tuple[str, str, str]] = []
    summary_path = run_dir / "summary.json"
    # wall time of stages finished by an earlier invocation of this run
    stage_seconds: dict[str, float] = json.loads(summary_path.read_text()).get("stage_seconds", {}) if summary_path.exists() else {}
    for name in cfg.stages:
        section = cfg[name]
        stage_dir = run_dir / name
        done = stage_dir / "DONE.json"
        if done.exists():
            outputs[name] = json.loads(done.read_text())
            console.rule(f"[dim]{name} ({section.kind}): done earlier, skipped")
            timings.append((name, section.kind, "skipped"))
            continue
        console.rule(f"[bold]{name}[/bold] ({section.kind})")
        spec = get_stage(section.kind)
        stage_cfg = resolve_stage_refs(stage_config(cfg, name), outputs, name)  # before the stage leaves a trace
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(run_dir=run_dir, stage_dir=stage_dir, recipe=cfg, seed=int(cfg.run.seed), outputs=dict(outputs))
        t0 = time.time()
        result = spec.fn(stage_cfg, ctx)
        if not isinstance(result, dict):
            raise TypeError(f"stage {name!r} ({section.kind}) returned {type(result).__name__}, not a dict of outputs")
        json.dumps(result)  # outputs must be JSON-serialisable; fail here, not on re-run
        _write_json(done, result)
        outputs[name] = result
        stage_seconds[name] = round(time.time() - t0, 1)
        timings.append((name, section.kind, f"{stage_seconds[name]:.1f} s"))
    _write_json(run_dir / "summary.json", run_summary(cfg, outputs, stage_seconds))

    table = Table(title=f"run {cfg.run.name}: {run_dir}")
    for col in ("stage", "kind", "time"):
        table.add_column(col)
    for row in timings:
        table.add_row(*row)
    console.print(table)
    return outputs


def resolve_stage_refs(stage_cfg: Any, outputs: dict[str, dict], name: str) -> Any:
    """A stage config with every string field of the form `stage:NAME.KEY` (e.g. `data.train_path:
    stage:pretrain.mixed_train_path`, `model_path: stage:pretrain.model_path`), nested sections included,
    replaced by that earlier stage's output; a reference to a stage that has not run or an output it
    lacks is a ConfigError."""
    for key, holder, field_name in settings(stage_cfg, name):
        value = getattr(holder, field_name)
        m = STAGE_REF.match(value) if isinstance(value, str) else None
        if m is None:
            continue
        stage, output = m.groups()
        if stage not in outputs:
            raise ConfigError(f"{key}={value!r}: stage {stage!r} has not run before {name!r} (earlier stages: {', '.join(outputs) or 'none'})")
        if outputs[stage].get(output) is None:
            raise ConfigError(f"{key}={value!r}: stage {stage!r} has no output {output!r} (its outputs: {', '.join(outputs[stage])})")
        setattr(holder, field_name, str(outputs[stage][output]))
    return stage_cfg


def run_summary(cfg: DictConfig, outputs: dict[str, dict], stage_seconds: dict[str, float]) -> dict:
    """The figures people look for first: held-out accuracy before and after RL (from the last
    stage that reports them), steps, total wall time, each eval suite's pass@1 (the last eval stage's
    under `eval`, every eval stage's under `evals`), a compare stage's table (`comparison`), and the per-stage
    scorecard (held-out accuracy per domain, readability) when the recipe has one."""
    summary: dict = {"recipe": cfg.run.name, "stages": list(cfg.stages)}
    for name in cfg.stages:
        out = outputs.get(name, {})
        for key in ("base_accuracy", "final_accuracy", "steps"):
            if key in out:
                summary[key] = out[key]
        for suite, report in (out.get("suites") or {}).items():
            summary.setdefault("eval", {})[suite] = {k: report[k] for k in ("pass@1", "n_problems", "k") if k in report}
        if out.get("scorecard"):
            summary["per_stage"] = out["scorecard"]
        if "report_path" in out:  # every eval stage, by name: several models on the same suites
            summary.setdefault("evals", {})[name] = {"model_path": out.get("model_path"), **{
                suite: report.get("pass@1") for suite, report in (out.get("suites") or {}).items()}}
        if out.get("comparison"):
            summary["comparison"] = out["comparison"]
    summary["stage_seconds"] = {name: stage_seconds[name] for name in cfg.stages if name in stage_seconds}
    summary["wall_seconds"] = round(sum(summary["stage_seconds"].values()), 1)
    return summary


def model_path_error(cfg: DictConfig) -> str | None:
    """One line naming the key when model.path, or a listed stage's own model_path / teacher_path (a
    path, not a `stage:` reference), is set but is not a loadable checkpoint directory with its tokenizer
    (stages read the tokenizer from the model's directory); else None."""
    paths = [("model.path", (cfg.get("model") or {}).get("path"))]
    paths += [(f"{name}.{key}", cfg[name].get(key)) for name in cfg.stages for key in ("model_path", "teacher_path")]
    for key, path in paths:
        if path and not STAGE_REF.match(str(path)):
            error = checkpoint_dir_error(str(path), key) or tokenizer_dir_error(str(path), key)
            if error:
                return error
    return None


def main(args: argparse.Namespace) -> int:
    """Errors propagate to the CLI (r1pipe.cli.run_command), which prints them as one or two lines."""
    console = Console()
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        raise ConfigError(f"bad recipe: {e}") from None
    if args.dry_run:
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
        console.print(f"[dim]run directory: {run_dir_for(cfg, args.run_dir)}[/dim]")
        return 0
    error = model_path_error(cfg)
    if error:  # on the driver, before any stage or Ray actor starts
        raise ModelError(error)
    check_cluster(cfg.cluster)  # a cluster that does not answer fails now, not after the stages before Ray's
    run_recipe(cfg, run_dir_for(cfg, args.run_dir), console)
    return 0
