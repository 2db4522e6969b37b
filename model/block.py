"""One decoder block: pre-norm MLA, then pre-norm FFN (dense SwiGLU in the first layers, DeepSeekMoE after)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import MLA
from .cache import LatentCache
from .config import ModelConfig
from .moe import MLP, MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (MoE(config, f"{prefix}.mlp") if config.is_moe_layer(layer)
                               else MLP(config.hidden_size, config.intermediate_size, config.fp8_for(f"{prefix}.mlp")))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, positions: Tensor,
                cache: LatentCache | None, routing: Tensor | None, token_mask: Tensor | None
                ) -> tuple[Tensor, Tensor | None, Tensor]:
        """-> (hidden, expert ids or None, sequence balance loss)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, positions, cache)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, ids, balance = self.mlp(x, routing, token_mask)
            return h + y, ids, balance
        return h + self.mlp(x), None, h.new_zeros((), dtype=torch.float32)
