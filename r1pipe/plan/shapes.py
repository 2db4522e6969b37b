"""A model's sizes as `r1pipe plan` needs them, read from a config alone (no weights): r1pipe's DeepSeek-V3
(ModelConfig: a preset or a checkpoint's config.json) or a dense Llama / Qwen2 (transformers' AutoConfig of a
checkpoint directory, or a DENSE_PRESETS shape).

The model is cut into the units FSDP shards (r1pipe.workers.sharding.shard): one per decoder block and the
root, which holds the embedding, the final norm, the head (tied or not) and V3's MTP modules. Each unit
counts its parameters, the routed-expert share of them (what expert parallelism splits) and the projections
an FP8 model holds in FP8 (r1pipe.model.fp8.memory). The counts are model/info.py's formulas.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from r1pipe.errors import ModelError
from r1pipe.model import ModelConfig
from r1pipe.model.fp8.memory import fp8_bytes, quantized_projections
from r1pipe.model.info import (
    DenseShape, dense_layer_parameters, dense_shape, layer_parameters, mtp_layer_parameters, routed_expert_parameters,
)
from r1pipe.vocab import DENSE_PRESETS, PRESETS

V3 = "deepseek_v3"


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: `params` parameters, of which `routed` are routed experts; `quantized` / `scale_blocks`
    (and `routed_quantized` / `routed_scale_blocks`) are the FP8 projection parameters and their fp32 128x128
    block scales outside (inside) the routed experts."""

    name: str
    params: int
    routed: int = 0
    quantized: int = 0
    scale_blocks: int = 0
    routed_quantized: int = 0
    routed_scale_blocks: int = 0

    def per_rank(self, ep_size: int) -> float:
        """Parameters a rank holds whole when the routed experts are split over ep_size ranks."""
        return self.params - self.routed + self.routed / ep_size

    def fp8_bytes(self, ep_size: int) -> float:
        """Bytes of the unit's weights on one rank with FP8 projections (the rest bf16), experts split by ep_size."""
        other = fp8_bytes(self.params - self.routed, self.quantized, self.scale_blocks)
        routed = fp8_bytes(self.routed, self.routed_quantized, self.routed_scale_blocks)
        return other + routed / ep_size


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one model: its FSDP units (blocks, then the root) and what activations and caches depend on."""

    name: str  # how the plan names it: a preset, or the directory the config came from
    model_type: str  # deepseek_v3 | llama | qwen2
    blocks: tuple[Unit, ...]
    root: Unit
    mtp: Unit | None  # V3's MTP modules (inside the root unit): trained only by some stages
    context: int  # max_position_embeddings
    v3: ModelConfig | None = None
    dense: DenseShape | None = None

    @property
    def is_v3(self) -> bool:
        return self.v3 is not None

    @property
    def units(self) -> tuple[Unit, ...]:
        return (*self.blocks, self.root)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def routed(self) -> int:
        return sum(u.routed for u in self.units)

    @property
    def n_routed_experts(self) -> int:
        return self.v3.n_routed_experts if self.v3 is not None else 0

    @property
    def vocab_size(self) -> int:
        return self.v3.vocab_size if self.v3 is not None else self.dense.vocab_size  # type: ignore[union-attr]

    @property
    def hidden_size(self) -> int:
        return self.v3.hidden_size if self.v3 is not None else self.dense.hidden_size  # type: ignore[union-attr]


def _v3_unit(c: ModelConfig, name: str, layers: range, params: int) -> Unit:
    quantized, blocks = quantized_projections(c, layers, routed=False)
    routed_quantized, routed_blocks = quantized_projections(c, layers, routed=True)
    return Unit(name, params, sum(routed_expert_parameters(c, i) for i in layers), quantized, blocks,
                routed_quantized, routed_blocks)


def v3_shape(c: ModelConfig, name: str) -> ModelShape:
    """The units of r1pipe's DeepSeek-V3 with config `c` (its fp8_exclude decides which projections are FP8)."""
    D, L = c.hidden_size, c.num_hidden_layers
    blocks = tuple(_v3_unit(c, f"layer {i}", range(i, i + 1), layer_parameters(c, i)) for i in range(L))
    mtp_layers = range(L, L + c.num_nextn_predict_layers)
    mtp = _v3_unit(c, "mtp", mtp_layers, sum(mtp_layer_parameters(c, i) for i in mtp_layers)) if mtp_layers else None
    embed = c.vocab_size * D
    own = embed * (1 if c.tie_word_embeddings else 2) + D  # embedding, head, final norm: never FP8
    root = Unit("root", own + (mtp.params if mtp else 0), *(dataclasses.astuple(mtp)[2:] if mtp else ()))
    return ModelShape(name, V3, blocks, root, mtp, c.max_position_embeddings, v3=c)


def dense_model_shape(s: DenseShape, name: str) -> ModelShape:
    """The units of a dense Llama / Qwen2 model (no experts; FP8 compute is V3's only, so nothing quantized)."""
    embed = s.vocab_size * s.hidden_size
    blocks = tuple(Unit(f"layer {i}", dense_layer_parameters(s)) for i in range(s.num_hidden_layers))
    root = Unit("root", embed * (1 if s.tie_word_embeddings else 2) + s.hidden_size)
    return ModelShape(name, s.model_type, blocks, root, None, s.max_position_embeddings, dense=s)


def preset_shape(preset: str, overrides: dict[str, Any] | None = None, fp8_exclude: list[str] | None = None) -> ModelShape:
    """A V3 preset (ModelConfig fields in `overrides` over it) or a dense preset (transformers config fields)."""
    overrides = dict(overrides or {})
    if preset in DENSE_PRESETS:
        fields = {**DENSE_PRESETS[preset], **overrides}
        return dense_model_shape(dense_shape(AutoConfig.for_model(fields.pop("model_type"), **fields)), preset)
    if preset not in PRESETS:
        raise ModelError(f"{preset!r}: neither a model preset ({', '.join([*PRESETS, *DENSE_PRESETS])}) nor a "
                         "directory or file with a config.json")
    fields = {**PRESETS[preset], **overrides, "fp8_exclude": list(fp8_exclude or [])}
    try:
        config = ModelConfig(**fields)
    except TypeError as e:
        raise ModelError(f"model.overrides: {e}") from None
    return v3_shape(config, preset)


def config_shape(path: str | Path, fp8_exclude: list[str] | None = None) -> ModelShape:
    """The shape of a checkpoint directory's config.json (or of a config.json file), read without weights."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelError(f"{path}: no config.json (a Hugging Face layout checkpoint directory is expected)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{file}: cannot read it as JSON ({e})") from None
    model_type = raw.get("model_type")
    try:
        if model_type in (V3, "kimi_k2"):
            config = ModelConfig.from_dict(raw, strict=False)
            config.fp8_exclude = list(fp8_exclude or [])
            return v3_shape(config, str(path))
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        return dense_model_shape(dense_shape(AutoConfig.for_model(model_type, **fields)), str(path))
    except (ValueError, TypeError) as e:
        raise ModelError(f"{file}: {e}") from None


def resolve_shape(name_or_path: str, overrides: dict[str, Any] | None = None,
                  fp8_exclude: list[str] | None = None) -> ModelShape:
    """A checkpoint directory or config.json file when one exists at `name_or_path`, else a preset's shape."""
    if Path(name_or_path).expanduser().exists():
        return config_shape(name_or_path, fp8_exclude)
    return preset_shape(name_or_path, overrides, fp8_exclude)
