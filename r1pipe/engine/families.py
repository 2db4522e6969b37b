"""Which model families the engine runs, and loading one as an EngineModel.

A checkpoint directory's config.json names its family (model_type): deepseek_v3 is r1pipe's own DeepSeek-V3
(r1pipe.engine.v3), llama and qwen2 are transformers' dense models (r1pipe.engine.dense). `check_supported`
reads config.json only, so a driver can refuse a checkpoint before any actor starts.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from r1pipe.causal_lm import V3, is_v3, model_type_of
from r1pipe.engine.adapter import EngineModel
from r1pipe.engine.dense import DENSE_MODEL_TYPES, DenseModel, check_dense_config
from r1pipe.engine.v3 import V3Model
from r1pipe.errors import ConfigError
from r1pipe.model import load_pretrained
from r1pipe.model.expert_parallel import ExpertShard, hold_local_experts
from r1pipe.model.precision import hold_fp8_weights

SUPPORTED_MODEL_TYPES = (V3, *DENSE_MODEL_TYPES)


def unsupported(where: str, model_type: object) -> ConfigError:
    return ConfigError(f"{where}: model_type {model_type!r} is not supported by r1pipe's engine; supported model "
                       f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_supported(path: str | Path) -> str:
    """The checkpoint's model_type when the engine runs it (reads config.json only, no weights); else a
    ConfigError naming the supported model types (a ModelError when there is no config.json)."""
    model_type = model_type_of(path)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported(str(path), model_type)
    if model_type in DENSE_MODEL_TYPES:
        check_dense_config(AutoConfig.from_pretrained(str(path)), str(path))
    return model_type


def check_fp8(model_type: str, fp8: bool) -> None:
    if fp8 and model_type != V3:
        raise ConfigError(f"fp8=True: the engine's FP8 weights are for r1pipe's DeepSeek-V3; this is a {model_type} "
                          "model (run it in dtype float32 or bfloat16)")


def check_sharded(model_type: str, expert_shard: ExpertShard | None) -> None:
    if expert_shard is not None and model_type != V3:
        raise ConfigError(f"ep_size={expert_shard.size}: expert parallelism splits the routed experts of r1pipe's "
                          f"DeepSeek-V3; this is a {model_type} model without them (set ep_size: 1)")


def load_engine_model(model: str | Path | nn.Module, dtype: torch.dtype, device: torch.device,
                      fp8: bool = False, expert_shard: ExpertShard | None = None) -> EngineModel:
    """The engine's model in `dtype` on `device`: from a checkpoint directory, or a model object (r1pipe's
    Transformer or a transformers Llama / Qwen2, used in place; with fp8 or expert_shard a V3 object is copied
    first). fp8: FP8 projection weights (r1pipe.model.precision.hold_fp8_weights), V3 only. expert_shard: one
    process of an expert-parallel engine, holding only its rank's routed experts (V3 only; a checkpoint's other
    experts are not read)."""
    if isinstance(model, (str, Path)):
        model_type = check_supported(model)
        check_fp8(model_type, fp8)
        check_sharded(model_type, expert_shard)
        if model_type == V3:
            adapted: EngineModel = V3Model(load_pretrained(model, dtype=dtype, device=device, expert_shard=expert_shard))
        else:
            adapted = DenseModel.load(model, dtype, device)
    elif is_v3(model):
        own = copy.deepcopy(model) if fp8 or expert_shard is not None else model
        if expert_shard is not None:
            hold_local_experts(own, expert_shard)
        adapted = V3Model(own.to(device=device, dtype=dtype))
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DENSE_MODEL_TYPES:
            raise unsupported(type(model).__name__, model_type)
        check_fp8(model_type, fp8)
        check_sharded(model_type, expert_shard)
        adapted = DenseModel(model.to(device=device, dtype=dtype))
    if fp8:
        hold_fp8_weights(adapted.module)
    return adapted
