"""Multi-token prediction module k: combine the previous depth's hidden state at t with the embedding of token
t+k+1 (each RMS-normed, concatenated, projected), run one decoder block, predict token t+k+2 through the shared
head. Stored like the official checkpoints: model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.*,<block params>}."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import Block
from .config import ModelConfig
from .linear import make_linear
from .norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig, head: nn.Linear):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = head  # the main model's output head, shared (stored again under this name in checkpoints)


class MTPModule(Block):
    def __init__(self, config: ModelConfig, layer: int, embed_tokens: nn.Embedding, head: nn.Linear):
        super().__init__(config, layer)
        D = config.hidden_size
        self.embed_tokens = embed_tokens  # shared with the main model
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = make_linear(2 * D, D, fp8=config.fp8_for(f"model.layers.{layer}.eh_proj"))
        self.shared_head = SharedHead(config, head)

    def combine(self, hidden: Tensor, next_ids: Tensor, detach_shared: bool = False) -> Tensor:
        """[B,S,D] hidden of token t and ids of token t+k+1 -> block input [B,S,D]. `detach_shared`: the
        shared embedding is read through its detached weight (no gradient reaches it from here)."""
        if detach_shared:
            e = F.embedding(next_ids, self.embed_tokens.weight.detach())
        else:
            e = self.embed_tokens(next_ids)
        return self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))

    def logits(self, hidden: Tensor, detach_shared: bool = False) -> Tensor:
        """[B,S,D] -> [B,S,V] float32 through the shared head (its weight detached with `detach_shared`)."""
        x = self.shared_head.norm(hidden)
        if detach_shared:
            head = self.shared_head.head
            return F.linear(x, head.weight.detach(), None if head.bias is None else head.bias.detach()).float()
        return self.shared_head.head(x).float()


def chain_mask(S: int, depth: int, device: torch.device | None = None) -> Tensor:
    """Attention mask [depth*S, depth*S] (True = may attend) for `depth` chained drafting blocks of S indices.

    Block a's query at index i sees block 0's keys at indices <= i and blocks 1..a at index i only: what a
    drafter cache holds when the chain drafts (catch-up entries up to t, then the chain's own)."""
    i = torch.arange(S, device=device)
    causal = i[None, :] <= i[:, None]
    eye = torch.eye(S, dtype=torch.bool, device=device)
    mask = torch.zeros(depth * S, depth * S, dtype=torch.bool, device=device)
    for a in range(depth):
        rows = slice(a * S, (a + 1) * S)
        mask[rows, :S] = causal
        for b in range(1, a + 1):
            mask[rows, b * S:(b + 1) * S] = eye
    return mask
