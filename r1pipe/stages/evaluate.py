"""Stage `eval`: score a model of the run (the newest, or `model_path`, e.g. `stage:teacher.model_path`)
on evaluation suites with r1pipe.eval; one eval stage per model puts teacher and students on the
same suites in one recipe.

Suites are shipped names (gsm8k, math500, ... and the groups math / code / all), any data-layer
source of math problems (a JSONL / Parquet / CSV file, a save_to_disk directory or a hub
`name:split`; fields auto-detected), or `heldout`: the held-out problems an earlier stage wrote
(its "heldout_path").
Writes report.json / report.md / generations.jsonl in the stage folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from r1pipe.stages.base import StageConfig, StageContext, register_stage


@dataclass
class EvalConfig(StageConfig):
    kind: str = "eval"
    suites: list[str] = field(default_factory=lambda: ["heldout"])
    model_path: Optional[str] = None  # default: the newest earlier stage's model, else model.path
    k: int = 1  # samples per problem (pass@1 is averaged over them)
    greedy: bool = True
    temperature: float = 0.6  # the R1 paper's evaluation setting, when not greedy
    top_p: float = 0.95
    max_tokens: int = 4096
    template: str = "r1-zero"  # r1pipe.data.templates: auto | r1-zero | r1 | chat | raw
    limit: Optional[int] = None  # first N problems of each suite
    pass_at: list[int] = field(default_factory=list)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not self.suites:
            raise ValueError("suites: give at least one suite")
        if self.k < 1:
            raise ValueError(f"k={self.k}: must be >= 1")
        if self.greedy and self.k != 1:
            raise ValueError(f"k={self.k}: greedy decoding gives one sample per problem, use k=1 or greedy=false")


def resolve_suite_list(cfg: EvalConfig, ctx: StageContext) -> list:
    """Suite objects for r1pipe.eval.evaluate: names stay names, files and `heldout` are loaded."""
    from r1pipe.eval.suites import GROUPS, REGISTRY, load_suite_file, resolve_suites

    suites: list = []
    for name in cfg.suites:
        if name == "heldout":
            path = ctx.output("heldout_path")
            if path is None:
                raise ValueError("eval suite 'heldout': no earlier stage of this run wrote a heldout_path")
            # rows carry the bare question in "problem" and the template is applied by eval
            suites.append(load_suite_file(path, name="heldout", prompt_field="problem"))
        elif name in REGISTRY or name in GROUPS:
            suites.extend(resolve_suites(name))
        else:  # a file, a save_to_disk directory or a hub dataset
            suites.append(load_suite_file(name, log=lambda line: print(f"eval: {line}")))
    return suites


@register_stage("eval", EvalConfig)
def run_eval(cfg: EvalConfig, ctx: StageContext) -> dict:
    from r1pipe.eval import evaluate

    model_path = Path(cfg.model_path).expanduser() if cfg.model_path else ctx.model_path()
    report = evaluate(
        str(model_path), resolve_suite_list(cfg, ctx), ctx.stage_dir, k=cfg.k, greedy=cfg.greedy,
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, template=cfg.template,
        backend=cfg.backend, seed=ctx.seed, limit=cfg.limit, pass_at=list(cfg.pass_at),
    )
    return {"report_path": str(ctx.stage_dir / "report.json"), "model_path": str(model_path), "suites": report.get("suites", {})}
