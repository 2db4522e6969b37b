"""The DeepSeek-V3 causal LM: embedding, decoder blocks, final norm, output head, and the MTP modules.

State-dict keys are exactly the Hugging Face checkpoint keys, so checkpoints load with no renaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import SharedPrefix
from .block import Block
from .cache import LatentCache
from .config import ModelConfig
from .experts import PROJECTIONS, GroupedExperts
from .moe import MoE
from .mtp import MTPModule, chain_mask
from .norm import RMSNorm
from .rope import rope_cos_sin, rope_inv_freq


@dataclass
class ModelOutput:
    logits: Tensor  # [B,S,V] float32
    hidden: Tensor  # [B,S,D] final normed hidden state
    mtp_logits: list[Tensor] = field(default_factory=list)  # module k at t predicts token t+k+2
    routing: list[Tensor] | None = None  # expert ids [B,S,k] per MoE layer of the main model
    aux_loss: Tensor | None = None  # seq_aux_alpha * sequence-wise balance loss (summed over MoE layers)


def _with_next_token(attention_mask: Tensor | None, input_ids: Tensor, ahead: int) -> Tensor:
    """The token weights [B,S] an MTP module reading token t+ahead counts in its expert loads: a position whose
    row has no token `ahead` further on (its input is padding, or wraps round) weighs 0, so the loads do not
    depend on how far a batch is padded."""
    weight = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    has_next = torch.roll(weight > 0, shifts=-ahead, dims=1)
    has_next[:, max(0, weight.shape[1] - ahead):] = False
    return weight * has_next.to(weight.dtype)


class Decoder(nn.Module):
    """Holds `model.*` keys: embed_tokens, layers (main blocks, then MTP modules), norm."""

    def __init__(self, config: ModelConfig, lm_head: nn.Linear):
        super().__init__()
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers: list[nn.Module] = [Block(config, i) for i in range(L)]
        layers += [MTPModule(config, L + k, self.embed_tokens, lm_head) for k in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model = Decoder(config, self.lm_head)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.compute_dtype = torch.float32  # bfloat16: forward under autocast over the fp32 weights (precision.py)
        inv_freq, self.rope_attention_factor = rope_inv_freq(config)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        if not self.lm_head.weight.is_meta:
            self.init_weights(torch.Generator(device=self.lm_head.weight.device).manual_seed(seed))

    # ---- structure
    @property
    def blocks(self) -> list[Block]:
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp_modules(self) -> list[MTPModule]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def moe_layers(self, include_mtp: bool = True) -> list[MoE]:
        layers = self.model.layers if include_mtp else self.blocks
        return [b.mlp for b in layers if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Normal(0, initializer_range) for projections, embedding and router; ones for norms; zero biases."""
        std = self.config.initializer_range
        experts = {name: m for name, m in self.named_modules() if isinstance(m, GroupedExperts)}
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            group, _, proj = name.rpartition(".")
            if group in experts:  # drawn expert by expert, in the order per-expert linears were drawn
                if proj == PROJECTIONS[0]:
                    module = experts[group]
                    for j in range(module.num_experts):
                        for each in PROJECTIONS:
                            getattr(module, each)[j].normal_(0.0, std, generator=generator)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for moe in self.moe_layers():
            if not moe.gate.e_score_correction_bias.is_meta:
                moe.gate.e_score_correction_bias.zero_()

    # ---- forward
    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast region the forward runs in: enabled only for a non-fp32 compute_dtype."""
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCache | None = None,
                attention_mask: Tensor | None = None, routing: list[Tensor] | None = None,
                return_routing: bool = False, mtp: bool = False, prefix: SharedPrefix | None = None) -> ModelOutput:
        """input_ids [B,S]; positions [B,S] (default 0..S-1); attention_mask [B,S]: 0 on padding, else the
        number of rows a token stands for (1, or more for a shared prompt packed once: the MoE expert loads
        count it that many times); prefix: packed rows of shared prompts and their completions (their attention
        pattern, r1pipe.workers.packing) instead of causal rows; routing: replayed expert ids per MoE layer."""
        with self.autocast(input_ids.device):
            return self._forward(input_ids, positions, cache, attention_mask, routing, return_routing, mtp, prefix)

    def _forward(self, input_ids: Tensor, positions: Tensor | None, cache: LatentCache | None,
                 attention_mask: Tensor | None, routing: list[Tensor] | None, return_routing: bool, mtp: bool,
                 prefix: SharedPrefix | None = None) -> ModelOutput:
        c = self.config
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        moe_count = sum(b.is_moe for b in self.blocks)
        if routing is not None and len(routing) != moe_count:
            raise ValueError(f"routing has {len(routing)} tensors; the model has {moe_count} MoE layers")
        if prefix is not None and mtp:
            raise ValueError("mtp=True reads the next tokens of a row; packed rows (prefix) have none")
        mask, cache_positions = self._masks(positions, attention_mask, cache, prefix)
        cos, sin = rope_cos_sin(self.rope_inv_freq, self.rope_attention_factor, positions)
        h = self.model.embed_tokens(input_ids)
        routes: list[Tensor] = []
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            replay = routing[len(routes)] if routing is not None and block.is_moe else None
            h, ids, balance = block(h, cos, sin, mask, cache_positions, cache, replay, attention_mask)
            aux = aux + balance
            if ids is not None:
                routes.append(ids)
        hidden = self.model.norm(h)
        logits = self.lm_head(hidden).float()
        mtp_logits: list[Tensor] = []
        if mtp:
            prev = hidden
            for k, module in enumerate(self.mtp_modules):
                # module k at position t reads token t+k+1; the last k+1 positions have no such token (not meaningful)
                next_ids = torch.roll(input_ids, shifts=-(k + 1), dims=1)
                prev, step_logits, balance = self._mtp_step(module, prev, next_ids, cos, sin, mask, cache_positions,
                                                            cache, _with_next_token(attention_mask, input_ids, k + 1))
                mtp_logits.append(step_logits)
                aux = aux + balance
        return ModelOutput(logits=logits, hidden=hidden, mtp_logits=mtp_logits,
                           routing=routes if return_routing else None, aux_loss=c.seq_aux_alpha * aux)

    def mtp_step(self, k: int, hidden: Tensor, next_ids: Tensor, positions: Tensor,
                 cache: LatentCache | None = None, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run MTP module k alone (for speculative drafting): hidden [B,S,D] of tokens at `positions` and the ids
        of the tokens one step later -> (module hidden to chain into module k+1, logits [B,S,V])."""
        mask, cache_positions = self._masks(positions, attention_mask, cache)
        cos, sin = rope_cos_sin(self.rope_inv_freq, self.rope_attention_factor, positions)
        with self.autocast(hidden.device):
            h, logits, _ = self._mtp_step(self.mtp_modules[k], hidden, next_ids, cos, sin, mask, cache_positions, cache,
                                      attention_mask)
        return h, logits

    def mtp_draft_chain(self, hidden: Tensor, input_ids: Tensor, depth: int,
                        attention_mask: Tensor | None = None, detach_shared: bool = False) -> list[Tensor]:
        """MTP module 0 drafting `depth` tokens ahead at every position, exactly as self-speculation does.

        hidden [B,S,D] (the main model's final hidden states), input_ids [B,S] -> depth tensors [B,S,V]:
        entry j-1 at index t reads token t+j and drafts token t+j+1 (the last j indices are not meaningful).
        Depth 1 is the module on the main hidden state at position t. Depth j > 1 chains depth j-1's output
        hidden state at position t+j-1 and attends to what the engine's drafter cache holds when it drafts:
        the depth-1 entries at positions <= t and the chain's own entries at t+1..t+j-1 (`chain_mask`).
        Depth j's pass recomputes depths < j as its keys (the block takes one sequence), so the cost grows
        as depth^2 MTP-block passes: small for the k of 1-3 that speculation uses. `detach_shared`: the
        embedding and head the module shares with the main model enter with detached weights, so a loss on
        these logits has gradients for the module's own parameters only (GRPO's draft loss)."""
        module = self.mtp_modules[0]
        B, S = input_ids.shape
        index = torch.arange(S, device=input_ids.device).expand(B, S)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        with self.autocast(hidden.device):
            prev, logits = hidden, []
            inputs: list[Tensor] = []
            for j in range(1, depth + 1):
                inputs.append(module.combine(prev, torch.roll(input_ids, shifts=-j, dims=1), detach_shared))
                positions = torch.cat([index + b for b in range(j)], dim=1)
                cos, sin = rope_cos_sin(self.rope_inv_freq, self.rope_attention_factor, positions)
                tokens = valid.repeat(1, j)
                # a padded query that sees nothing attends itself, so softmax stays finite (its output is unused)
                eye = torch.eye(j * S, dtype=torch.bool, device=input_ids.device)
                mask = (chain_mask(S, j, input_ids.device) & tokens[:, None, :]) | eye
                h, _, _ = module(torch.cat(inputs, dim=1), cos, sin, mask, positions, None, None, tokens)
                prev = h[:, -S:]
                logits.append(module.logits(prev, detach_shared))
        return logits

    def _mtp_step(self, module: MTPModule, prev: Tensor, next_ids: Tensor, cos: Tensor, sin: Tensor,
                  mask: Tensor | None, positions: Tensor, cache: LatentCache | None, attention_mask: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        h, _, balance = module(module.combine(prev, next_ids), cos, sin, mask, positions, cache, None, attention_mask)
        return h, module.logits(h), balance

    @staticmethod
    def _masks(positions: Tensor, attention_mask: Tensor | None, cache: LatentCache | None,
               prefix: SharedPrefix | None = None) -> tuple[Tensor | SharedPrefix | None, Tensor]:
        """(self-attention mask [B,S,S] for the no-cache path, or `prefix` itself for packed rows; positions for
        the cache with padding as -1)."""
        if prefix is not None:
            if cache is not None:
                raise ValueError("prefix (packed rows) is for the no-cache path")
            return prefix, positions
        if cache is not None:
            cache_positions = positions if attention_mask is None else positions.masked_fill(~attention_mask.bool(), -1)
            return None, cache_positions
        if (attention_mask is None or right_padded(attention_mask)) and _is_arange(positions):
            return None, positions  # plain causal attention: a real token never sees the padding after it
        mask = positions[:, None, :] <= positions[:, :, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        # a padded query that sees nothing attends itself, so softmax stays finite (its output is never used)
        mask = mask | torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
        return mask, positions

    # ---- balancing
    def expert_load(self) -> list[Tensor]:
        """Tokens routed to each expert since the last update_router_bias, per MoE layer (main, then MTP)."""
        return [moe.expert_load.clone() for moe in self.moe_layers()]

    def update_router_bias(self, gamma: float | None = None) -> list[float]:
        """Auxiliary-loss-free balancing after an optimizer step; returns each MoE layer's MaxVio."""
        gamma = self.config.bias_update_gamma if gamma is None else gamma
        return [moe.update_bias(gamma) for moe in self.moe_layers()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def right_padded(attention_mask: Tensor) -> bool:
    """Whether every row of attention_mask [B,S] (0 on padding) is its real tokens, then only padding: under
    causal attention no real token can then see a padded one, and the padding needs no mask."""
    real = attention_mask > 0
    return bool((real[:, 1:] <= real[:, :-1]).all())


def _is_arange(positions: Tensor) -> bool:
    S = positions.shape[1]
    return bool((positions == torch.arange(S, device=positions.device)).all())
