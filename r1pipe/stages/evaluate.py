"""Stage `eval`: score a model of the run (the newest, or `model_path`, e.g. `stage:teacher.model_path`)
on evaluation suites with r1pipe.eval; one eval stage per model puts teacher and students on the
same suites in one recipe.

Suites are shipped names (gsm8k, math500, ... and the groups math / code / all), any data-layer
source of math problems (a JSONL / Parquet / CSV file, a save_to_disk directory or a hub
`name:split`; fields auto-detected), or `heldout`: the held-out problems of `heldout_path`, by default
the newest earlier stage output "heldout_path".
Generates with `workers` rollout workers of `backend` (r1pipe.workers.generation) in the run's Ray cluster.
Writes report.json / report.md / generations.jsonl in the stage folder.
"""
from __future__ import annotations

from pathlib import Path

from r1pipe.errors import ConfigError
from r1pipe.eval import evaluate
from r1pipe.eval.suites import GROUPS, REGISTRY, load_suite_file, resolve_suites
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import EvalConfig
from r1pipe.workers.cluster import ray_init


def resolve_suite_list(cfg: EvalConfig, ctx: StageContext) -> list:
    """Suite objects for r1pipe.eval.evaluate: names stay names, files and `heldout` are loaded."""
    suites: list = []
    for name in cfg.suites:
        if name == "heldout":
            path = cfg.heldout_path or ctx.output("heldout_path")
            if path is None:
                raise ConfigError("eval suite 'heldout': set heldout_path, or run a stage that writes one before")
            # rows carry the bare question in "problem" and the template is applied by eval
            suites.append(load_suite_file(path, name="heldout", prompt_field="problem"))
        elif name in REGISTRY or name in GROUPS:
            suites.extend(resolve_suites(name))
        else:  # a file, a save_to_disk directory or a hub dataset
            suites.append(load_suite_file(name, log=lambda line: print(f"eval: {line}")))
    return suites


def run_eval(cfg: EvalConfig, ctx: StageContext) -> dict:
    model_path = Path(cfg.model_path).expanduser() if cfg.model_path else ctx.model_path()
    suites = resolve_suite_list(cfg, ctx)
    ray_init(ctx.recipe)
    report = evaluate(
        str(model_path), suites, ctx.stage_dir, k=cfg.k, greedy=cfg.greedy,
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, template=cfg.template,
        backend=cfg.backend, workers=cfg.workers, seed=ctx.seed, limit=cfg.limit, pass_at=list(cfg.pass_at),
    )
    return {"report_path": str(ctx.stage_dir / "report.json"), "model_path": str(model_path), "suites": report.get("suites", {})}
