"""The engine's KV cache in preallocated blocks (paged), with per-sequence block tables.

Per token and layer the cache stores two streams of `heads` heads of fixed widths (`widths`): for r1pipe's
DeepSeek-V3 one head of the normalised KV latent (kv_lora_rank values) and of the RoPE'd shared key
(qk_rope_head_dim values); for a dense model the post-RoPE keys and the values of its num_key_value_heads
heads (head_dim values each, see r1pipe.engine.dense). Each head's slots are contiguous (head-major), so a
gather yields [heads, B, T, width] ready for batched attention. Block 0 is a scratch block: padding tokens
are written there and unused block-table entries point at it, so every index stays in range and is masked
out.

Before each forward the engine calls `plan(...)` with the rows' block tables and the positions it
feeds; `update` (the model's LatentCache protocol) then writes the new tokens into their slots and
gathers each row's cached tokens in position order, so key index j is position j (`update_heads` does the
same for several heads, into reused buffers). `attend` (MLA) writes the new tokens and computes the absorbed
attention itself (r1pipe.engine.paged_attention): through the Triton kernel, which reads the pool via the
block table, or through the gather and the torch path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from r1pipe.engine.paged_attention import paged_kernel, resolve_backend
from r1pipe.model.attention import absorbed_attention, attention_bias

SCRATCH_BLOCK = 0


class BlockAllocator:
    """Free list and reference counts of the cache blocks (shared prompt blocks are ref-counted)."""

    def __init__(self, num_blocks: int, on_first_use: Callable[[int], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 cache blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._used = [False] * num_blocks
        self._on_first_use = on_first_use

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("latent cache is out of blocks (the scheduler should have prevented this)")
        block = self._free.pop()
        self._refs[block] = 1
        if not self._used[block]:
            self._used[block] = True
            if self._on_first_use is not None:
                self._on_first_use(block)
        return block

    def share(self, block: int) -> None:
        self._refs[block] += 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
            elif self._refs[block] < 0:
                raise RuntimeError(f"cache block {block} freed twice")


class PagedCache:
    """Two per-token streams per layer, each `heads` heads of widths[i] values, in a block pool shared by all
    sequences; with one head it implements r1pipe.model.cache.LatentCache (streams: the KV latent and the RoPE'd
    key). pools[i]: [num_layers, heads, num_blocks * block_size, widths[i]]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, widths: tuple[int, int], heads: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention_backend: str = "auto") -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.widths, self.heads = (int(widths[0]), int(widths[1])), int(heads)
        slots = num_blocks * block_size
        # uninitialised, so memory is only touched as blocks come into use; a block is zeroed on first use
        # (masked keys still enter the attention product with weight 0, so they must never hold NaN)
        self.pools = tuple(torch.empty(num_layers, heads, slots, w, dtype=dtype, device=device) for w in self.widths)
        self._gathered: list[torch.Tensor | None] = [None, None]  # update_heads' reused output buffers, per stream
        self.allocator = BlockAllocator(num_blocks, on_first_use=self._zero_block)
        self._zero_block(SCRATCH_BLOCK)
        self.device = torch.device(device)
        self.attention_backend = resolve_backend(attention_backend, self.device)
        self._table: torch.Tensor | None = None  # [B, max_blocks] block ids
        self._query_pos: torch.Tensor | None = None  # [B, S] position of each fed token, -1 for padding
        self._write: torch.Tensor | None = None  # [B*S] slot per fed token (scratch for padding)
        self._mask: torch.Tensor | None = None  # [B, S, T]
        self._bias: torch.Tensor | None = None  # attention_bias(_mask), made by the forward's first attend
        self._positions: torch.Tensor | None = None
        self._shape: tuple[int, int, int] = (0, 0, 0)
        self._pinned: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}  # (B, S, T) -> plan buffers

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all cached layers."""
        per_layer = self.heads * sum(self.widths) * self.pools[0].element_size()
        return per_layer * self.num_layers

    def plan(self, block_tables: list[list[int]], positions: torch.Tensor, valid: torch.Tensor,
             context_lens: list[int] | None = None, width: int | None = None) -> None:
        """Set up the next forward. block_tables[b] are row b's blocks in order; positions [B, S] are
        the positions fed (padding entries may hold anything); valid [B, S] marks real tokens. A query
        at position p attends keys 0..p of its row; a padding query attends key 0 only.
        context_lens[b] (default: max position + 1) bounds the keys gathered. width: a fixed number of
        table blocks per row (static shapes for a captured or compiled forward), else the fewest that hold
        the context. When `pin_plan` has made buffers for this plan's shapes, the plan is written into them."""
        B, S = positions.shape
        bs = self.block_size
        if width is None:
            if context_lens is None:
                context_lens = (positions.masked_fill(~valid, 0).amax(dim=1) + 1).tolist()
            width = max(1, max(-(-n // bs) for n in context_lens))
        elif any(len(blocks) > width for blocks in block_tables):
            raise ValueError(f"a block table is longer than the plan's width {width}")
        rows = [blocks[:width] + [SCRATCH_BLOCK] * (width - len(blocks)) for blocks in block_tables]
        table = torch.tensor(rows, dtype=torch.long, device=self.device)
        positions = positions.to(self.device)
        valid = valid.to(self.device)
        T = width * bs
        slot_of_position = (table.unsqueeze(-1) * bs + torch.arange(bs, device=self.device)).view(B, T)
        safe_pos = torch.where(valid, positions, torch.zeros_like(positions)).clamp_(max=T - 1)
        write = slot_of_position.gather(1, safe_pos)
        key_pos = torch.arange(T, device=self.device)
        query_pos = torch.where(valid, positions, torch.zeros_like(positions))
        plan = {"write": torch.where(valid, write, torch.full_like(write, SCRATCH_BLOCK * bs)).reshape(-1),
                "mask": key_pos.view(1, 1, T) <= query_pos.unsqueeze(-1), "table": table,
                "query_pos": torch.where(valid, positions, torch.full_like(positions, -1)), "positions": positions}
        pinned = self._pinned.get((B, S, T))
        if pinned is not None:
            for name, tensor in plan.items():
                pinned[name].copy_(tensor)
            plan = pinned
        self._write, self._mask, self._table = plan["write"], plan["mask"], plan["table"]
        self._query_pos, self._positions = plan["query_pos"], plan["positions"]
        self._bias = None
        self._shape = (B, S, T)

    def pin_plan(self) -> None:
        """Keep the current plan's tensors as the buffers every later plan of the same shapes is copied into, so
        a forward captured in a CUDA graph reads each new plan where it read the first."""
        if self._write is None:
            raise RuntimeError("pin_plan before any plan()")
        self._pinned.setdefault(self._shape, {"write": self._write, "mask": self._mask, "table": self._table,
                                              "query_pos": self._query_pos, "positions": self._positions})

    def update(self, layer: int, first: torch.Tensor, second: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One head (LatentCache): store the planned tokens' streams first [B, S, widths[0]] and second
        [B, S, widths[1]] (`positions` is the plan's; accepted for the protocol) and return each row's cached tokens
        in position order: ([B, T, widths[0]], [B, T, widths[1]], mask [B, S, T], True where query s may attend
        key t)."""
        B, S, T = self._shape
        self._store(layer, first.reshape(1, B * S, -1), second.reshape(1, B * S, -1))
        blocks = self._table.reshape(-1)  # whole blocks in table order are the keys in position order
        return (*(pool[layer].view(self.num_blocks, -1).index_select(0, blocks).view(B, T, -1) for pool in self.pools),
                self._mask)

    def update_heads(self, layer: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the planned tokens' streams first [heads, B*S, widths[0]] and second [heads, B*S, widths[1]]
        (token b*S + s is row b's s-th fed token) and return each row's cached tokens in position order:
        [heads, B, T, widths[i]] per stream. The results live in buffers the next call reuses (consume them
        first); the mask is the plan's (`bias`)."""
        B, S, T = self._shape
        self._store(layer, first, second)
        blocks = self._table.reshape(-1)  # whole blocks in table order are the keys in position order
        out = []
        for i, pool in enumerate(self.pools):
            size = self.heads * B * T * self.widths[i]
            buffer = self._gathered[i]
            if buffer is None or buffer.numel() < size:  # grown, never shrunk: no fresh pages each layer
                buffer = self._gathered[i] = pool.new_empty(size)
            gathered = buffer[:size].view(self.heads, blocks.numel(), -1)
            torch.index_select(pool[layer].view(self.heads, self.num_blocks, -1), 1, blocks, out=gathered)
            out.append(gathered.view(self.heads, B, T, self.widths[i]))
        return out[0], out[1]

    def bias(self) -> torch.Tensor:
        """The plan's mask as the float32 bias added to attention scores, [B, S, 1, T] (r1pipe.model.attention
        attention_bias), made once per plan."""
        if self._bias is None:
            self._bias = attention_bias(self._mask)
        return self._bias

    def attend(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor,
               k_rope: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the planned tokens' kv_latent [B, S, C] and k_rope [B, S, R] (as `update`) and return the
        absorbed attention of q_latent [B, S, H, C] / q_rope [B, S, H, R] over each row's keys up to the
        query's position: out_latent [B, S, H, C] (padding queries' rows are meaningless)."""
        if self.attention_backend == "torch":
            latents, k_ropes, _ = self.update(layer, kv_latent, k_rope)
            return absorbed_attention(q_latent, q_rope, latents, k_ropes, self.bias(), scale)
        B, S, _ = self._shape
        self._store(layer, kv_latent.reshape(1, B * S, -1), k_rope.reshape(1, B * S, -1))
        return paged_kernel(q_latent, q_rope, self.pools[0][layer, 0], self.pools[1][layer, 0], self._table,
                            self._query_pos, self.block_size, scale)

    def _store(self, layer: int, first: torch.Tensor, second: torch.Tensor) -> None:
        """Write the planned tokens' streams, each [heads, B*S, width], into their slots."""
        if self._write is None:
            raise RuntimeError("PagedCache used without plan()")
        if layer >= self.num_layers:
            raise IndexError(f"cache has {self.num_layers} layers, got layer {layer}")
        B, S, _ = self._shape
        if first.shape[:2] != (self.heads, B * S):
            raise ValueError(f"planned {self.heads} heads of a [{B}, {S}] batch, the model fed "
                             f"{tuple(first.shape[:2])}")
        for pool, values in zip(self.pools, (first, second)):
            pool[layer].index_copy_(1, self._write, values.to(pool.dtype))

    def _zero_block(self, block: int) -> None:
        bs = self.block_size
        for pool in self.pools:
            pool[:, :, block * bs:(block + 1) * bs] = 0

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's contents in every layer (copy-on-write of a shared partial block)."""
        bs = self.block_size
        for pool in self.pools:
            pool[:, :, dst * bs:(dst + 1) * bs] = pool[:, :, src * bs:(src + 1) * bs]
