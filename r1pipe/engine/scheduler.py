"""Continuous batching: sequences, groups of n samples sharing one prompt, and admission under budgets.

A group (one prompt, n samples) is admitted when its prefill fits the token budget, its samples fit
max_num_seqs and the cache has blocks for its worst case (prompt + max_tokens for every sample), so a
running sequence never runs out of cache and nothing is ever preempted. The prompt's full blocks are
shared by the n samples (one prefill); its last partial block is copied per sample. Finished
sequences free their blocks at once and the next waiting group is admitted in the next step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from r1pipe.engine.paged_cache import BlockAllocator, PagedLatentCache
from r1pipe.engine.params import SamplingParams
from r1pipe.engine.sampler import RandomStream


@dataclass(eq=False)
class SequenceGroup:
    """One prompt and its n samples."""

    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seeds: list[int]
    seqs: list["Sequence"] = field(default_factory=list)
    prompt_blocks: list[int] = field(default_factory=list)
    prompt_routing: torch.Tensor | None = None  # [num_moe_layers, P, top_k]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(eq=False)
class Sequence:
    """One sample being generated. Tokens 0..num_cached-1 of prompt + output are in the cache."""

    group: SequenceGroup
    index: int
    stream: RandomStream
    blocks: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routing: list[torch.Tensor] = field(default_factory=list)  # per fed output token: [layers, top_k]
    num_cached: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_cut: int | None = None  # where a stop string begins in the decoded text
    awaiting_final_feed: bool = False  # finished, but its last token's routing is still to record
    # speculative decoding state: main hidden states not yet consumed by the MTP drafter
    pending_hidden: torch.Tensor | None = None

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def length(self) -> int:
        return self.group.prompt_len + len(self.output_ids)

    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.group.prompt_ids[-1]

    def token_at(self, position: int) -> int:
        P = self.group.prompt_len
        return self.group.prompt_ids[position] if position < P else self.output_ids[position - P]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """FIFO admission of waiting groups into the running set under the engine's budgets."""

    def __init__(self, cache: PagedLatentCache, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int = 0) -> None:
        self.cache = cache
        self.allocator: BlockAllocator = cache.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # extra positions written past the end (speculative drafts)
        self.waiting: deque[SequenceGroup] = deque()
        self.prefilling: list[SequenceGroup] = []  # admitted (prompt blocks held) but not yet forked
        self.running: list[Sequence] = []

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.cache.block_size)

    def worst_case_blocks(self, group: SequenceGroup) -> int:
        shared = group.prompt_len // self.cache.block_size
        per_seq = self._blocks(group.prompt_len + group.params.max_tokens + self.lookahead + 1) - shared
        return shared + group.params.n * per_seq

    def add(self, group: SequenceGroup) -> None:
        need = self.worst_case_blocks(group)
        if need > self.allocator.num_blocks - 1:
            raise ValueError(
                f"request {group.request_id} needs {need} cache blocks (prompt {group.prompt_len} + "
                f"max_tokens {group.params.max_tokens}, n={group.params.n}) but the cache has "
                f"{self.allocator.num_blocks - 1}; raise num_blocks or lower max_tokens / n")
        if group.params.n > self.max_num_seqs:
            raise ValueError(f"n={group.params.n} exceeds max_num_seqs={self.max_num_seqs}")
        if group.prompt_len > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {group.prompt_len} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}")
        if group.prompt_len == 0:
            raise ValueError(f"request {group.request_id} has an empty prompt")
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def abort(self) -> None:
        """Drop all work and free every block it holds (after an error mid-step)."""
        self.retire(list(self.running))
        for group in self.prefilling:
            self.allocator.free(group.prompt_blocks)
            group.prompt_blocks = []
        self.prefilling.clear()
        self.waiting.clear()

    def admit(self) -> list[SequenceGroup]:
        """Groups to prefill now; their prompt blocks are allocated."""
        admitted: list[SequenceGroup] = []
        num_seqs = len(self.running)
        free = self.allocator.num_free
        longest = 0
        while self.waiting:
            group = self.waiting[0]
            need = self.worst_case_blocks(group)
            padded = max(longest, group.prompt_len) * (len(admitted) + 1)
            if num_seqs + group.params.n > self.max_num_seqs or need > free:
                break
            if admitted and padded > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            admitted.append(group)
            num_seqs += group.params.n
            free -= need
            longest = max(longest, group.prompt_len)
        for group in admitted:
            group.prompt_blocks = [self.allocator.allocate() for _ in range(self._blocks(group.prompt_len))]
            self.prefilling.append(group)
        return admitted

    def fork(self, group: SequenceGroup) -> list[Sequence]:
        """The group's n sequences after its prefill: full prompt blocks shared, the partial last
        block copied for all but the first sample, and each sample's worst-case blocks allocated."""
        bs = self.cache.block_size
        P = group.prompt_len
        full = P // bs
        total = self._blocks(P + group.params.max_tokens + self.lookahead + 1)
        seqs = []
        for i in range(group.params.n):
            blocks = list(group.prompt_blocks[:full])
            for b in blocks:
                if i > 0:
                    self.allocator.share(b)
            if P % bs:
                partial = group.prompt_blocks[full]
                if i == 0:
                    blocks.append(partial)
                else:
                    copy = self.allocator.allocate()
                    self.cache.copy_block(partial, copy)
                    blocks.append(copy)
            blocks += [self.allocator.allocate() for _ in range(total - len(blocks))]
            seq = Sequence(group=group, index=i, stream=RandomStream(group.seeds[i]), blocks=blocks,
                           num_cached=P)
            seqs.append(seq)
        group.seqs = seqs
        self.prefilling.remove(group)
        self.running.extend(seqs)
        return seqs

    def retire(self, done: list[Sequence]) -> None:
        """Drop finished sequences from the running set and free their blocks."""
        if not done:
            return
        gone = set(map(id, done))
        self.running = [s for s in self.running if id(s) not in gone]
        for seq in done:
            self.allocator.free(seq.blocks)
            seq.blocks = []
