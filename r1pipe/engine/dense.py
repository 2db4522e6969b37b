"""Dense transformers causal LMs (Llama, Qwen2) in the engine: the model as transformers defines it, with its
attention reading and writing the engine's paged cache.

The engine holds the transformers model itself (AutoModelForCausalLM of the checkpoint, the class the trainer
holds, so weight names match the trainer's state dict and log-probs agree). Each forward runs it without
transformers' own cache (use_cache=False, position_ids = the engine's positions, so RoPE, whatever variant the
config names, is transformers' own) with the attention implementation switched to `PAGED_ATTENTION` for the
call: `paged_attention` gets the post-RoPE query [B, H, S, D] and key / value [B, Hkv, S, D] of the fed tokens,
stores the keys and values in the cache (two streams of Hkv heads of D values per token and layer) and attends
each query over its row's cached keys up to its position. That implementation has no entry in transformers'
mask registry, so transformers builds no mask either: the cache's plan is the mask.

Grouped-query attention is computed per KV head: the G = H / Hkv query heads sharing a KV head, times the S fed
tokens, are G * S query rows against that head's keys (two batched matmuls of [Hkv * B, G * S, D] against the
gathered [Hkv * B, T, D], softmax in float32 as transformers' eager attention), so keys and values are never
repeated per query head.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM

from r1pipe.engine.adapter import EngineModel, ModelFacts
from r1pipe.engine.paged_cache import PagedCache
from r1pipe.errors import ConfigError
from r1pipe.model import ModelOutput

DENSE_MODEL_TYPES = ("llama", "qwen2")
PAGED_ATTENTION = "r1pipe_paged"


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    r1pipe_cache: PagedCache | None = None, r1pipe_bias: torch.Tensor | None = None,
                    **_: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over the engine's paged cache (the plan the runner made for
    this forward): query [B, H, S, D], key / value [B, Hkv, S, D] of the fed tokens (post-RoPE) are stored at
    layer `module.layer_idx`, then each query attends its row's keys 0..its position. r1pipe_bias: the plan's
    mask as an additive float32 bias, [1, B, 1, S, T]. Returns (output [B, S, H, D], None)."""
    if r1pipe_cache is None or r1pipe_bias is None:
        raise RuntimeError(f"attention {PAGED_ATTENTION!r} runs only inside the engine's forward (DenseModel.forward)")
    B, Hkv, S, D = key.shape
    H = query.shape[1]
    G = H // Hkv
    keys, values = r1pipe_cache.update_heads(module.layer_idx, key.transpose(0, 1).reshape(Hkv, B * S, D),
                                             value.transpose(0, 1).reshape(Hkv, B * S, D))  # [Hkv, B, T, D]
    T = keys.shape[2]
    rows = query.view(B, Hkv, G, S, D).transpose(0, 1).reshape(Hkv * B, G * S, D)  # head h = kv * G + g
    scores = torch.bmm(rows, keys.view(Hkv * B, T, D).transpose(1, 2)).view(Hkv, B, G, S, T)
    scale = D ** -0.5 if scaling is None else scaling
    probs = torch.softmax(scores.float().mul_(scale).add_(r1pipe_bias), dim=-1).to(values.dtype)
    out = torch.bmm(probs.view(Hkv * B, G * S, T), values.view(Hkv * B, T, D))  # [Hkv * B, G * S, D]
    return out.view(Hkv, B, G, S, D).permute(1, 3, 0, 2, 4).reshape(B, S, H, D), None


AttentionInterface.register(PAGED_ATTENTION, paged_attention)


def check_dense_config(config, where: str) -> None:
    """A ConfigError naming what the engine cannot run in a Llama / Qwen2 config: another model type, or
    sliding-window attention layers (Qwen2's use_sliding_window)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in DENSE_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a dense model the engine runs "
                          f"({', '.join(DENSE_MODEL_TYPES)})")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ConfigError(f"{where}: layer_types {sorted(layer_types)}: the engine runs full-attention layers only "
                          "(set use_sliding_window: false)")


class DenseModel(EngineModel):
    """A transformers Llama / Qwen2 causal LM (GQA, Qwen2's q/k/v biases, tied embeddings, the config's RoPE
    variant) over the engine's paged cache; cache streams: keys and values, num_key_value_heads heads of head_dim."""

    def __init__(self, module: nn.Module) -> None:
        c = module.config
        check_dense_config(c, type(module).__name__)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        super().__init__(module, ModelFacts(
            model_type=c.model_type, vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
            eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_hidden_layers=c.num_hidden_layers,
            cache_widths=(head_dim, head_dim), cache_heads=c.num_key_value_heads))

    @staticmethod
    def load(path: str | Path, dtype: torch.dtype, device: torch.device) -> "DenseModel":
        """The checkpoint's AutoModelForCausalLM in `dtype` on `device`."""
        return DenseModel(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: PagedCache, return_routing: bool = False,
                last: torch.Tensor | None = None) -> ModelOutput:
        """ids / positions [B, S] -> ModelOutput(logits [B, S, V] float32, or [B, 1, V] at `last` [B] (the LM
        head runs on those positions only), hidden None, routing [])."""
        config = self.module.config
        bias = cache.bias()  # [B, S, 1, T], made once for every layer
        B, S, _, T = bias.shape
        bias = bias.view(1, B, 1, S, T)
        previous = config._attn_implementation
        config._attn_implementation = PAGED_ATTENTION  # for this call only: the module stays the trainer's class
        try:
            hidden = self.module.model(input_ids=ids, position_ids=positions, use_cache=False, r1pipe_cache=cache,
                                       r1pipe_bias=bias).last_hidden_state  # [B, S, D]
        finally:
            config._attn_implementation = previous
        if last is not None:
            hidden = hidden[torch.arange(B, device=hidden.device), last, None]
        logits = self.module.lm_head(hidden)  # Llama / Qwen2: the LM head is all that follows the decoder
        return ModelOutput(logits=logits.float(), hidden=None, routing=[])  # type: ignore[arg-type]
