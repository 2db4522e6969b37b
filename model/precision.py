"""Precision as a recipe states it (`model.dtype`, `model.fp8`, `model.fp8_exclude`), applied to a model.

Training keeps fp32 master weights and optimizer state whatever the compute dtype: `dtype: bfloat16` runs
the forward (and so the backward) under torch.autocast, which casts each matmul's operands to bf16 on the
fly, while parameters, their gradients and AdamW's moments stay fp32. (Autocast rather than a bf16 copy of
the weights: nothing outside the model changes - optimizers, checkpoints, gradient all-reduce and weight
pushes to the engine still see fp32 parameters - and the router, norms, softmax and loss stay fp32 as the
V3 recipe wants.) `fp8: true` turns every projection made by `make_linear` (and the routed experts) into
block-scaled FP8 compute, except modules whose name matches an `fp8_exclude` fnmatch pattern; embeddings,
the output head and the router gate never go FP8.
An inference engine instead casts the weights themselves to `dtype` (no master copy is needed there).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from r1pipe.vocab import DTYPE_NAMES, dtype_name

from .config import ModelConfig
from .experts import GroupedExperts

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


def parse_dtype(name: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' (or a torch.dtype of those) -> torch.dtype.
    Anything else is a ValueError naming `key` and the accepted names."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"{key}: {name} is not supported; expected one of {sorted(DTYPES)}")
    return getattr(torch, dtype_name(name, key))


@dataclass
class Precision:
    """What a model section of a recipe says about precision (see the module docstring)."""

    dtype: torch.dtype = torch.float32  # compute dtype; master weights stay fp32
    fp8: bool = False
    fp8_exclude: list[str] = field(default_factory=list)

    @classmethod
    def from_section(cls, section: Any) -> "Precision":
        """From the recipe's `model` section (a mapping, a DictConfig or ModelConfigSection)."""
        get = section.get if isinstance(section, Mapping) or hasattr(section, "get") else (
            lambda k, d=None: getattr(section, k, d))
        exclude = get("fp8_exclude", None) or []
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"model.fp8_exclude: expected a list of fnmatch patterns, got {exclude!r}")
        return cls(dtype=parse_dtype(get("dtype", "float32") or "float32"), fp8=bool(get("fp8", False)),
                   fp8_exclude=list(exclude))

    def apply_to_config(self, config: ModelConfig) -> ModelConfig:
        """Set config.fp8 / fp8_exclude (so checkpoints saved from the model carry them)."""
        config.fp8, config.fp8_exclude = self.fp8, list(self.fp8_exclude)
        return config


def _is_head(model: nn.Module, linear: nn.Linear) -> bool:
    head = getattr(model, "lm_head", None)
    return head is not None and linear.weight is head.weight


def apply_precision(model: nn.Module, precision: Precision) -> nn.Module:
    """Make `model` (a Transformer, weights in place) compute as `precision` says; returns it.

    Projections switch between nn.Linear and FP8Linear keeping the very same weight Parameter (so an optimizer
    built before still holds it); the routed experts switch their fp8 flag; the compute dtype is set for the
    model's forward (bf16 runs under autocast with fp32 master weights). Modules holding FP8 weights from an
    official checkpoint stay FP8.
    """
    from .fp8 import FP8Linear

    config: ModelConfig = model.config  # type: ignore[assignment]
    precision.apply_to_config(config)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, GroupedExperts):
                child.fp8 = config.fp8_for(name)
                continue
            if not isinstance(child, nn.Linear) or _is_head(model, child):
                continue
            want_fp8 = config.fp8_for(name)
            is_fp8 = isinstance(child, FP8Linear)
            if want_fp8 == is_fp8 or (is_fp8 and child.holds_fp8_weight):
                continue
            cls = FP8Linear if want_fp8 else nn.Linear
            with torch.device("meta"):
                new = cls(child.in_features, child.out_features, bias=child.bias is not None)
            new.weight, new.bias = child.weight, child.bias
            setattr(parent, child_name, new)
    model.compute_dtype = precision.dtype
    return model


def hold_fp8_weights(model: nn.Module) -> int:
    """Inference in FP8 (the rollout engine's `fp8`): every projection `apply_precision` would make FP8 (config.fp8
    on, `fp8_exclude` kept) holds its weight as float8_e4m3fn in 128x128 blocks with fp32 block scales, the
    routed experts per expert; activations are quantized in 1x128 tiles in each GEMM. Embeddings, the output
    head, the router and the norms keep their dtype. The master weights are dropped (no training after this).
    Returns how many projection modules (an experts module counts once) now hold FP8 weights."""
    from .fp8 import FP8Linear

    config: ModelConfig = model.config  # type: ignore[assignment]
    apply_precision(model, Precision(dtype=getattr(model, "compute_dtype", torch.float32), fp8=True,
                                     fp8_exclude=list(config.fp8_exclude)))
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear) or (isinstance(module, GroupedExperts) and module.fp8):
            module.quantize_weight_()
            count += 1
    return count


__all__ = ["DTYPES", "parse_dtype", "Precision", "apply_precision", "hold_fp8_weights"]
