"""`r1pipe model info <preset|path>`: parameter counts, activated parameters, KV-cache and weight memory.

Counts are computed from the config (the same formulas the model's modules realise; a test checks them
against real module trees), so the 671B shape is reported instantly without building it. The same
arithmetic per layer (`layer_parameters`, `routed_expert_parameters`, `mtp_layer_parameters`) and for dense
Llama / Qwen2 students (`DenseShape`) feeds `r1pipe plan` (r1pipe.plan).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from r1pipe.errors import ModelError

from .config import PRESETS, ModelConfig
from .fp8.memory import fp8_weight_memory


@dataclass
class ParameterCounts:
    total: int  # main model, as instantiated (embedding and head once)
    mtp: int  # the MTP modules' own parameters (they share the embedding and head)
    mtp_stored: int  # as stored in checkpoints: MTP modules plus their copies of embedding and head
    activated: int  # per token, DeepSeek's convention: all but unselected routed experts and the embedding table
    activated_with_embedding: int

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_stored


def _attention(c: ModelConfig) -> int:
    H, D = c.num_attention_heads, c.hidden_size
    bias = c.attention_bias
    if c.q_lora_rank is None:
        q = D * H * c.qk_head_dim
    else:
        q = D * c.q_lora_rank + bias * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + bias * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + H * c.v_head_dim * D + bias * D


def layer_parameters(c: ModelConfig, layer: int, activated: bool = False) -> int:
    """Parameters of decoder block `layer` (all its routed experts, or only the num_experts_per_tok a token
    activates)."""
    D = c.hidden_size
    n = _attention(c) + 2 * D
    if not c.is_moe_layer(layer):
        return n + 3 * D * c.intermediate_size
    expert = 3 * D * c.moe_intermediate_size
    routed = c.num_experts_per_tok if activated else c.n_routed_experts
    return n + c.n_routed_experts * D + routed * expert + c.n_shared_experts * expert


def routed_expert_parameters(c: ModelConfig, layer: int) -> int:
    """Parameters of block `layer`'s routed experts (what expert parallelism splits); 0 in a dense layer."""
    return c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size if c.is_moe_layer(layer) else 0


def norm_and_router_parameters(c: ModelConfig, layer: int) -> int:
    """Parameters of block `layer` that are not projection weights (its RMSNorms, the router, biases): what
    stays in high precision when the projections are FP8."""
    D = c.hidden_size
    norms = 2 * D + c.kv_lora_rank + (c.q_lora_rank or 0)
    bias = c.attention_bias * ((c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + D)
    return norms + bias + (c.n_routed_experts * D if c.is_moe_layer(layer) else 0)


def mtp_layer_parameters(c: ModelConfig, layer: int) -> int:
    """Parameters of MTP module `layer` (>= num_hidden_layers) of its own: its block, enorm, hnorm, the shared
    head's norm and eh_proj (the embedding and head it shares with the main model not counted)."""
    D = c.hidden_size
    return layer_parameters(c, layer) + 3 * D + 2 * D * D


def parameter_counts(c: ModelConfig) -> ParameterCounts:
    D, L = c.hidden_size, c.num_hidden_layers
    embed = c.vocab_size * D
    head = 0 if c.tie_word_embeddings else embed
    total = embed + head + D + sum(layer_parameters(c, i) for i in range(L))
    activated = embed + D + sum(layer_parameters(c, i, True) for i in range(L))  # the output head (tied or not) counts
    mtp = sum(mtp_layer_parameters(c, i) for i in range(L, L + c.num_nextn_predict_layers))
    return ParameterCounts(total=total, mtp=mtp, mtp_stored=mtp + c.num_nextn_predict_layers * (embed + embed),
                           activated=activated, activated_with_embedding=activated + head)


def kv_cache_bytes_per_token_per_layer(c: ModelConfig, bytes_per_value: int = 2) -> tuple[int, int]:
    """(latent cache, equivalent multi-head K/V cache) in bytes per token per layer."""
    latent = (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value
    mha = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_value
    return latent, mha


@dataclass(frozen=True)
class DenseShape:
    """The sizes of a dense Llama / Qwen2 causal LM that its memory depends on (from its config.json)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q/k/v (always in Qwen2; Llama's attention_bias)
    o_bias: bool  # a bias on o_proj (Llama's attention_bias)
    mlp_bias: bool
    max_position_embeddings: int


def dense_shape(config: Any) -> DenseShape:
    """The DenseShape of a transformers config object (or any object with the same attributes)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ("llama", "qwen2"):
        raise ModelError(f"model_type {model_type!r}: sizes are known for deepseek_v3, llama and qwen2")
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return DenseShape(
        model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tie_word_embeddings=bool(config.tie_word_embeddings), qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias, mlp_bias=bool(getattr(config, "mlp_bias", False)),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 0) or 2048))


def dense_layer_parameters(s: DenseShape) -> int:
    """Parameters of one decoder layer: q/k/v/o projections (GQA), the SwiGLU MLP, two RMSNorms."""
    D, I, q, kv = s.hidden_size, s.intermediate_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attention = D * q + 2 * D * kv + q * D + s.qkv_bias * (q + 2 * kv) + s.o_bias * D
    return attention + 3 * D * I + s.mlp_bias * (2 * I + D) + 2 * D


def dense_parameter_count(s: DenseShape) -> int:
    """All parameters: embedding, layers, final norm, and the head unless tied to the embedding."""
    embed = s.vocab_size * s.hidden_size
    return embed * (1 if s.tie_word_embeddings else 2) + s.num_hidden_layers * dense_layer_parameters(s) + s.hidden_size


def dense_kv_bytes_per_token_per_layer(s: DenseShape, bytes_per_value: int = 2) -> int:
    """K and V of the num_key_value_heads heads (GQA), as the engine's paged cache holds them."""
    return 2 * s.num_key_value_heads * s.head_dim * bytes_per_value


def resolve(name_or_path: str) -> ModelConfig:
    if name_or_path in PRESETS:
        return ModelConfig.preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        return ModelConfig.from_pretrained(path)
    if path.is_file():
        return ModelConfig.from_dict(json.loads(path.read_text()), strict=False)
    raise ModelError(f"{name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint dir")


def _human(n: float, unit: str = "") -> str:
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
    for suffix, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {suffix}"
    return f"{n:.0f} B"


def report(c: ModelConfig) -> dict[str, object]:
    p = parameter_counts(c)
    latent, mha = kv_cache_bytes_per_token_per_layer(c)
    return {
        **asdict(p), "total_with_mtp": p.total_with_mtp,
        "kv_cache_bytes_per_token_per_layer": {"latent": latent, "multi_head": mha},
        "weight_bytes_bf16": 2 * p.total, "weight_bytes_bf16_with_mtp": 2 * p.total_with_mtp,
        **_fp8_figures(c, p.total),
    }


def _fp8_figures(c: ModelConfig, total: int) -> dict[str, int]:
    m = fp8_weight_memory(c, total)
    return {"weight_bytes_fp8": m.fp8_bytes, "fp8_quantized_params": m.quantized_params,
            "fp8_scale_blocks": m.scale_blocks}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def main(args: argparse.Namespace) -> int:
    c = resolve(args.model)
    r = report(c)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    p = parameter_counts(c)
    latent, mha = kv_cache_bytes_per_token_per_layer(c)
    rows = [
        ("layers", f"{c.num_hidden_layers} (+{c.num_nextn_predict_layers} MTP), {c.first_k_dense_replace} dense"),
        ("experts", f"{c.n_routed_experts} routed (top {c.num_experts_per_tok}, {c.n_group} groups, "
                    f"top {c.topk_group}) + {c.n_shared_experts} shared"),
        ("total parameters", f"{_human(p.total)} ({p.total:,})"),
        ("total with MTP", f"{_human(p.total_with_mtp)} ({p.total_with_mtp:,}; as stored, incl. MTP's embedding "
                           f"and head copies; {_human(p.total + p.mtp)} unique)"),
        ("activated per token", f"{_human(p.activated)} ({p.activated:,}; excl. embedding table, "
                                f"{_human(p.activated_with_embedding)} incl.)"),
        ("KV cache / token / layer", f"{latent:,} B latent (bf16, {c.kv_lora_rank}+{c.qk_rope_head_dim} values) vs "
                                     f"{mha:,} B multi-head ({mha / latent:.1f}x)"),
        ("weights in bf16", f"{_bytes(2 * p.total)} ({_bytes(2 * p.total_with_mtp)} with MTP)"),
        ("weights in FP8", f"{_bytes(r['weight_bytes_fp8'])} (projections 1 B/param + fp32 scale per 128x128 "
                           f"block, rest bf16; {r['weight_bytes_fp8'] / (2 * p.total):.1%} of bf16)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"DeepSeek-V3 model: {args.model}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0
