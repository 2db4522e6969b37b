"""A recipe's stages as `r1pipe plan` sees them: each stage's model, its GPU roles and their memory per device.

The recipe is loaded and validated as `r1pipe run` loads it (r1pipe.config.load_recipe), except that its
`run.tiny_recipe` is not followed: the plan is of the recipe as written, at full size. Each stage's model
follows the run's rules (r1pipe.stages.base.StageContext.model_path): its `model_path` (a checkpoint
directory or config.json, a `stage:NAME.model_path` reference, or, since only sizes are read, a preset
name), else the newest earlier stage's model, else the recipe's `model.path` or `model.preset` with
`model.overrides`.

Expert parallelism is read from `<stage>.parallelism.ep_size` (trainers) and `<stage>.rollout.engine.ep_size`
(GRPO) or `<stage>.engine.ep_size` (sampling stages), default 1, checked here against the stage's model:
integers >= 1 that divide the trainer (rollout) workers and the model's routed experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from r1pipe.config import STAGE_REF, load_recipe, stage_config
from r1pipe.errors import ConfigError
from r1pipe.stages.sections import Workers
from r1pipe.vocab import dtype_name

from .memory import GiB, EngineSetup, Memory, TrainerSetup, engine_memory, kv_bytes_per_token, trainer_memory
from .shapes import ModelShape, preset_shape, resolve_shape

# r1pipe.engine.LLM's defaults
ENGINE_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "speculative_k": 0, "cache_memory_gb": 0.5}
MODEL_KINDS = ("pretrain", "sft", "grpo", "teacher", "eval")  # stages whose outputs name a model_path


@dataclass(frozen=True)
class RolePlan:
    """One role's workers of a stage and the bytes each one's device holds, per precision ("bf16", "fp8")."""

    role: str  # trainer | rollout
    key: str  # the recipe section, e.g. reasoning_rl.resources.trainer
    workers: int
    gpus: float  # per worker
    ep_size: int
    memory: dict[str, Memory]
    detail: str  # what the figures assume, in words
    recipe_precision: str  # the precision the recipe runs it in: bf16, fp8 or float32
    trainer: TrainerSetup | None = None
    engine: EngineSetup | None = None
    batch_rows: int = 0  # trainer: sequences per optimizer step over all workers (the micro-batch is per worker)
    micro_rows: int = 0  # trainer: the recipe's micro-batch size
    micro_key: str = ""  # trainer: the recipe key of the micro-batch size
    engine_key: str | None = None  # rollout: the recipe key of the engine options (None: the stage has none)


@dataclass
class StageInfo:
    """A stage's model and roles, before the fit check (r1pipe.plan.report adds placement and layouts)."""

    name: str
    kind: str
    model: ModelShape | None
    roles: list[RolePlan] = field(default_factory=list)
    cpu_workers: list[tuple[str, int]] = field(default_factory=list)  # (role, workers) that use no GPU
    notes: list[str] = field(default_factory=list)
    strategy: str = "PACK"


def load(recipe: str, overrides: list[str]) -> DictConfig:
    """The validated recipe, its tiny_recipe not followed."""
    return load_recipe(recipe, [*overrides, "run.tiny_recipe=null"])


def recipe_model(cfg: DictConfig) -> ModelShape:
    m = cfg.model
    if m.path:
        return resolve_shape(m.path, fp8_exclude=list(m.fp8_exclude))
    return preset_shape(m.preset, dict(m.overrides), list(m.fp8_exclude))


def plan_stages(cfg: DictConfig, prompt_tokens: int) -> list[StageInfo]:
    """Every listed stage's model and roles, in order."""
    base = recipe_model(cfg)
    models: dict[str, ModelShape] = {}
    current: ModelShape | None = None
    out = []
    for name in cfg.stages:
        s = stage_config(cfg, name)
        model = _stage_model(cfg, s, models, current or base)
        info = StageInfo(name, s.kind, model)
        if s.kind in ("sft", "pretrain"):
            _trainer_stage(cfg, info, s, model)
        elif s.kind == "grpo":
            _grpo_stage(cfg, info, s, model, prompt_tokens)
        elif s.kind in ("rejection_sample", "scorecard"):
            _sampling_stage(cfg, info, s, model, prompt_tokens)
        elif s.kind == "eval":
            _eval_stage(info, s, model, prompt_tokens)
        if s.kind in MODEL_KINDS and model is not None:
            models[name] = current = model
        out.append(info)
    return out


def _stage_model(cfg: DictConfig, s: Any, models: dict[str, ModelShape], current: ModelShape) -> ModelShape | None:
    if s.kind == "pretrain":
        return preset_shape(s.preset, dict(s.model_overrides), list(cfg.model.fp8_exclude)) if s.preset else current
    if s.kind in ("compare",):
        return None
    path = getattr(s, "model_path", None)
    if not path:
        return current
    ref = STAGE_REF.match(path)
    if ref is not None:
        return models.get(ref.group(1), current)
    return resolve_shape(path, fp8_exclude=list(cfg.model.fp8_exclude))


def _precision(cfg: DictConfig, fp8: bool, dtype: str | None = None) -> str:
    if fp8:
        return "fp8"
    return "bf16" if dtype_name(dtype or cfg.model.dtype) == "bfloat16" else "float32"


def _gpus(info: StageInfo, device: str, w: Workers, key: str) -> float:
    """The GPUs each worker is planned with: as asked, or 1 (with a note) when the recipe would run it on CPU."""
    if device == "cpu":
        info.notes.append(f"{key}: resources.device is cpu; planned as if each worker had a GPU of its own "
                          f"(set {key.rsplit('.', 1)[0]}.device=cuda and {key}.gpus=1 to run it so)")
        return 1.0
    if w.gpus <= 0:
        info.notes.append(f"{key}.gpus is 0 with device {device}: Ray gives these workers no GPU; planned with 1 "
                          f"each (set {key}.gpus=1)")
        return 1.0
    return float(w.gpus)


def _ep(key: str, declared: Any, workers: int, workers_key: str, model: ModelShape) -> int:
    value = declared if declared is not None else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: expected an integer >= 1")
    if value > 1 and not model.n_routed_experts:
        raise ConfigError(f"{key}={value}: {model.name} has no routed experts to split (expert parallelism is "
                          "for DeepSeek-V3 MoE layers)")
    if model.n_routed_experts % value:
        raise ConfigError(f"{key}={value}: must divide the {model.n_routed_experts} routed experts of {model.name}")
    if workers % value:
        raise ConfigError(f"{key}={value}: must divide {workers_key}={workers}")
    return value


def _trainer_role(cfg: DictConfig, info: StageInfo, s: Any, model: ModelShape, batch_rows: int,
                  micro_rows: int, micro_key: str, seq_len: int, trains_mtp: bool, frozen: ModelShape | None,
                  what: str) -> None:
    t, name = s.resources.trainer, info.name
    rows = min(micro_rows, math.ceil(batch_rows / t.workers))
    key = f"{name}.resources.trainer"
    ep_size = _ep(f"{name}.parallelism.ep_size", getattr(s.parallelism, "ep_size", None), t.workers,
                  f"{key}.workers", model)
    setup = TrainerSetup(workers=t.workers, rows=rows, seq_len=seq_len, ep_size=ep_size, fsdp=s.parallelism.fsdp,
                         keep_gathered=s.parallelism.fsdp_keep_gathered,
                         activation_checkpointing=s.parallelism.activation_checkpointing, trains_mtp=trains_mtp,
                         frozen=frozen)
    sharding = f"FSDP over {t.workers}" if s.parallelism.fsdp and t.workers > 1 else "unsharded"
    detail = f"{sharding}, ep_size {ep_size}, micro-batch {rows} x {seq_len} tokens{what}"
    info.roles.append(RolePlan("trainer", key, t.workers, _gpus(info, s.resources.device, t, key), ep_size,
                               _both(model, lambda fp8: trainer_memory(model, setup, fp8)), detail,
                               _precision(cfg, cfg.model.fp8), trainer=setup, batch_rows=batch_rows,
                               micro_rows=micro_rows, micro_key=f"{name}.{micro_key}"))
    info.strategy = s.resources.placement_strategy


def _both(model: ModelShape, memory) -> dict[str, Memory]:
    """The bytes in bf16 and, for a V3 model (FP8 compute is V3's), with FP8 projections."""
    out = {"bf16": memory(False)}
    if model.is_v3:
        out["fp8"] = memory(True)
    return out


def _trainer_stage(cfg: DictConfig, info: StageInfo, s: Any, model: ModelShape) -> None:
    seq_len = getattr(getattr(s, "data", None), "max_length", 0) or model.context
    trains_mtp = bool(getattr(s, "mtp", False)) and model.mtp is not None
    frozen = None
    if s.kind == "sft" and s.loss != "ce" and s.teacher_path:
        frozen = resolve_shape(s.teacher_path, fp8_exclude=list(cfg.model.fp8_exclude))
    if hasattr(getattr(s, "data", None), "max_length"):
        what = "" if s.data.max_length else " (the model's context: data.max_length is 0)"
    else:
        what = " (the model's context: the stage sets no sequence length)"
    micro_key = "micro_batch_size" if hasattr(s, "micro_batch_size") else "batch_size"
    _trainer_role(cfg, info, s, model, s.batch_size, getattr(s, micro_key), micro_key, seq_len, trains_mtp, frozen,
                  what)


def _engine_setup(engine: dict[str, Any], seq_len: int, ep_size: int, model: ModelShape) -> EngineSetup:
    opts = {**ENGINE_DEFAULTS, **engine}
    context = engine.get("max_model_len") or model.context
    return EngineSetup(max_num_seqs=opts["max_num_seqs"], seq_len=min(seq_len, context),
                       max_num_batched_tokens=opts["max_num_batched_tokens"], ep_size=ep_size,
                       speculative_k=opts["speculative_k"])


def _cache_cap(info: StageInfo, key: str | None, engine: dict[str, Any], setup: EngineSetup, model: ModelShape) -> None:
    """A note when the engine's own cache size (cache_memory_gb, unless num_blocks is set) holds fewer sequences
    of seq_len tokens than max_num_seqs: it then runs fewer at once, or none (a request longer than the cache fails)."""
    if engine.get("num_blocks"):
        return
    cap = {**ENGINE_DEFAULTS, **engine}["cache_memory_gb"]
    per_seq = setup.seq_len * kv_bytes_per_token(model, setup.speculative_k)
    holds = int(cap * GiB // per_seq)
    if holds >= setup.max_num_seqs:
        return
    need = per_seq * setup.max_num_seqs / GiB
    what = "not one" if holds == 0 else f"{holds}"
    where = f"{key}.cache_memory_gb={cap:g}" if key else f"the engine's default cache_memory_gb={cap:g} (not a stage key)"
    fix = f"; all of them take {need:,.1f} GiB" if key else ""
    info.notes.append(f"{info.name}: {where} caps the engine's cache at {cap:g} GiB, which holds {what} of the "
                      f"{setup.max_num_seqs} sequences of {setup.seq_len} tokens ({per_seq / GiB:.2f} GiB each)" +
                      (": a request longer than the cache fails" if holds == 0 else "") + fix)


def _rollout_role(cfg: DictConfig, info: StageInfo, key: str, w: Workers, device: str, engine: dict[str, Any],
                  ep_key: str, model: ModelShape, seq_len: int, dtype: str | None) -> None:
    ep_size = _ep(ep_key, engine.get("ep_size"), w.workers, f"{key}.workers", model)
    setup = _engine_setup(engine, seq_len, ep_size, model)
    engine_key = ep_key.rsplit(".", 1)[0]
    _cache_cap(info, engine_key, engine, setup, model)
    engines = w.workers // ep_size
    detail = (f"{engines} engine{'s' * (engines != 1)} of ep_size {ep_size}, max_num_seqs {setup.max_num_seqs} x "
              f"{setup.seq_len} tokens")
    precision = _precision(cfg, bool(engine.get("fp8")), engine.get("dtype") or dtype)
    info.roles.append(RolePlan("rollout", key, w.workers, _gpus(info, device, w, key), ep_size,
                               _both(model, lambda fp8: engine_memory(model, setup, fp8)), detail, precision,
                               engine=setup, engine_key=engine_key))


def _grpo_stage(cfg: DictConfig, info: StageInfo, s: Any, model: ModelShape,
                prompt_tokens: int) -> None:
    r, name = s.resources, info.name
    engine = dict(s.rollout.engine)
    context = engine.get("max_model_len") or model.context
    seq_len = min(prompt_tokens + s.rollout.max_tokens, context)
    draft = s.algorithm.draft_loss if s.algorithm.draft_loss is not None else bool(engine.get("speculative_k"))
    frozen = model if s.algorithm.kl_coef > 0 else None
    what = ", with the KL reference" if frozen else ""
    _trainer_role(cfg, info, s, model, s.rollout.prompts_per_step * s.rollout.group_size,
                  s.algorithm.micro_batch_size, "algorithm.micro_batch_size", seq_len, draft and model.mtp is not None,
                  frozen, what)
    _rollout_role(cfg, info, f"{name}.resources.rollout", r.rollout, r.device, engine, f"{name}.rollout.engine.ep_size",
                  model, seq_len, None)
    info.cpu_workers.append(("reward", r.reward.workers))


def _sampling_stage(cfg: DictConfig, info: StageInfo, s: Any, model: ModelShape,
                    prompt_tokens: int) -> None:
    engine = dict(getattr(s, "engine", {}) or {})
    _rollout_role(cfg, info, f"{info.name}.resources.rollout", s.resources.rollout, s.resources.device, engine,
                  f"{info.name}.engine.ep_size", model, prompt_tokens + s.max_tokens, None)
    info.cpu_workers.append(("reward", s.resources.reward.workers))
    info.strategy = s.resources.placement_strategy


def _eval_stage(info: StageInfo, s: Any, model: ModelShape, prompt_tokens: int) -> None:
    """An eval stage generates with `workers` engines of r1pipe.eval's defaults, one GPU each, in float32."""
    setup = _engine_setup({}, prompt_tokens + s.max_tokens, 1, model)
    key = f"{info.name}.workers"
    detail = f"{s.workers} engine{'s' * (s.workers != 1)}, max_num_seqs {setup.max_num_seqs} x {setup.seq_len} tokens"
    info.roles.append(RolePlan("rollout", key, s.workers, 1.0, 1, _both(model, lambda fp8: engine_memory(model, setup, fp8)),
                               detail, "float32", engine=setup))
    _cache_cap(info, None, {}, setup, model)
    info.notes.append(f"{info.name}: eval stages generate in float32 (the stage has no dtype key): its weights and "
                      "cache take twice the bf16 column")
