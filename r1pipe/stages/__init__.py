"""Pipeline stages (pretrain, grpo, sft, eval, ...) and their registry.

Every built-in kind maps to its config dataclass (r1pipe.stages.configs, which imports nothing heavy)
and to its stage function by name; the stage module is imported only when the stage runs, so
validating a recipe or `r1pipe run --dry-run` never pays for torch or Ray.
"""
from __future__ import annotations

from r1pipe.stages.base import StageConfig, StageContext, StageSpec, add_stage, register_stage, registered
from r1pipe.stages.configs import (
    CompareConfig, EvalConfig, GRPOConfig, PretrainConfig, RejectionSampleConfig, ScorecardConfig, SFTConfig, TeacherConfig,
)

BUILTIN_STAGES: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "r1pipe.stages.pretrain:run_pretrain"),
    "grpo": (GRPOConfig, "r1pipe.stages.grpo:run_grpo"),
    "sft": (SFTConfig, "r1pipe.stages.sft:run_sft"),
    "rejection_sample": (RejectionSampleConfig, "r1pipe.stages.rejection_sample:run_rejection_sample"),
    "scorecard": (ScorecardConfig, "r1pipe.stages.scorecard:run_scorecard"),
    "eval": (EvalConfig, "r1pipe.stages.evaluate:run_eval"),
    "teacher": (TeacherConfig, "r1pipe.stages.teacher:run_teacher"),
    "compare": (CompareConfig, "r1pipe.stages.compare:run_compare"),
}
for _kind, (_config_cls, _target) in BUILTIN_STAGES.items():
    add_stage(_kind, _config_cls, _target)


def get_stage(kind: str) -> StageSpec:
    """The registered stage `kind`; a KeyError listing the known kinds otherwise."""
    specs = registered()
    if kind not in specs:
        raise KeyError(f"unknown stage kind {kind!r}; known kinds: {sorted(specs)}")
    return specs[kind]


__all__ = ["BUILTIN_STAGES", "StageConfig", "StageContext", "StageSpec", "add_stage", "get_stage", "register_stage", "registered"]
