"""Weight memory with FP8 projections, from the config alone (the 671B shape is reported without building it).

Quantized projections cost 1 byte per parameter plus one fp32 scale per 128x128 block; everything else
(embeddings, output head, router, norms) stays bf16 at 2 bytes.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .quant import BLOCK, cdiv


@dataclass
class FP8WeightMemory:
    quantized_params: int  # parameters of the projections held in FP8
    scale_blocks: int  # fp32 weight_scale_inv entries
    bf16_bytes: int  # the whole main model in bf16
    fp8_bytes: int  # FP8 projections + scales + the rest in bf16


def projection_shapes(c, layers: Iterable[int] | None = None) -> Iterator[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every projection linear of `layers` (default: the main
    model's, no MTP; a layer >= num_hidden_layers is an MTP module, which adds its eh_proj)."""
    D, H = c.hidden_size, c.num_attention_heads
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    for i in range(c.num_hidden_layers) if layers is None else layers:
        if i >= c.num_hidden_layers:
            yield f"model.layers.{i}.eh_proj", D, 2 * D
        attn = f"model.layers.{i}.self_attn"
        if c.q_lora_rank is None:
            yield f"{attn}.q_proj", H * qk_head, D
        else:
            yield f"{attn}.q_a_proj", c.q_lora_rank, D
            yield f"{attn}.q_b_proj", H * qk_head, c.q_lora_rank
        yield f"{attn}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, D
        yield f"{attn}.kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank
        yield f"{attn}.o_proj", D, H * c.v_head_dim
        mlp = f"model.layers.{i}.mlp"
        if i < c.first_k_dense_replace:
            ffns = [(mlp, c.intermediate_size)]
        else:
            ffns = [(f"{mlp}.experts.{j}", c.moe_intermediate_size) for j in range(c.n_routed_experts)]
            if c.n_shared_experts:
                ffns.append((f"{mlp}.shared_experts", c.moe_intermediate_size * c.n_shared_experts))
        for prefix, hidden in ffns:
            yield f"{prefix}.gate_proj", hidden, D
            yield f"{prefix}.up_proj", hidden, D
            yield f"{prefix}.down_proj", D, hidden


def quantized_projections(c, layers: Iterable[int] | None = None, routed: bool | None = None) -> tuple[int, int]:
    """(parameters, fp32 scale blocks) of the projections of `layers` (as projection_shapes) held in FP8: those
    not in c.fp8_exclude; routed True / False: only the routed experts' / all but them, None: every one."""
    params = blocks = 0
    for name, out_f, in_f in projection_shapes(c, layers):
        # routed experts are one module per layer (model.layers.N.mlp.experts): excluded as a whole
        owner = re.sub(r"(\.experts)\.\d+\.\w+$", r"\1", name)
        if routed is not None and owner.endswith(".experts") != routed:
            continue
        if any(fnmatch.fnmatch(owner, p) for p in c.fp8_exclude):
            continue
        params += out_f * in_f
        blocks += cdiv(out_f, BLOCK) * cdiv(in_f, BLOCK)
    return params, blocks


def fp8_bytes(params: int, quantized: int, blocks: int) -> int:
    """Bytes of `params` parameters of which `quantized` are FP8 (1 B) with `blocks` fp32 scales, the rest bf16."""
    return 2 * (params - quantized) + quantized + 4 * blocks


def fp8_weight_memory(c, total_params: int) -> FP8WeightMemory:
    """Memory of the main model (total_params parameters) with every projection not in c.fp8_exclude in FP8."""
    params, blocks = quantized_projections(c)
    return FP8WeightMemory(params, blocks, 2 * total_params, fp8_bytes(total_params, params, blocks))
