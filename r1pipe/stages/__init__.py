"""Pipeline stages (pretrain, grpo, sft, eval, ...) and their registry.

A stage module is imported only when a recipe names its kind, so `r1pipe run --dry-run` never
pays for torch or Ray; stage modules keep heavy imports inside their stage function.
"""
from __future__ import annotations

import importlib

from r1pipe.stages.base import StageConfig, StageContext, StageSpec, register_stage, registered

# kind -> module that registers it; any other kind is looked up as r1pipe.stages.<kind>.
STAGE_MODULES: dict[str, str] = {
    "pretrain": "r1pipe.stages.pretrain",
    "grpo": "r1pipe.stages.grpo",
    "sft": "r1pipe.stages.sft",
    "eval": "r1pipe.stages.evaluate",
}


def get_stage(kind: str) -> StageSpec:
    """The registered stage `kind`, importing its module on first use."""
    specs = registered()
    if kind in specs:
        return specs[kind]
    module = STAGE_MODULES.get(kind, f"r1pipe.stages.{kind}")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise KeyError(f"unknown stage kind {kind!r} (no module {module}); known kinds: {sorted(STAGE_MODULES)}") from None
        raise
    specs = registered()
    if kind not in specs:
        raise KeyError(f"module {module} does not register a stage of kind {kind!r}")
    return specs[kind]


__all__ = ["STAGE_MODULES", "StageConfig", "StageContext", "StageSpec", "get_stage", "register_stage", "registered"]
