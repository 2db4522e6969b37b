"""Continuous batching: sequences, groups of n samples sharing one prompt, admission, on-demand blocks
and preemption by recompute.

A group (one prompt, n samples) is admitted when its prefill fits the token budget, its samples fit
max_num_seqs and the cache has blocks for its prompt (plus one block of growth per sample and per
running sequence). The prompt's full blocks are shared by the n samples (one prefill); its last partial
block is copied per sample. Before every step each running sequence gets the blocks the step writes
(on demand, so memory follows real lengths). When the cache is full, the youngest sequences (latest
request, highest sample index) are preempted: their blocks are freed and they wait, keeping their
tokens, log-probs, routing records and random stream; they are resumed before any new group is
admitted, by recomputing their cache in a prefill of all their tokens but the newest, and then
continue exactly as if never interrupted. Finished sequences free their blocks at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from r1pipe.engine.paged_cache import BlockAllocator, PagedCache
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
    weights_version: int = 0  # the engine's LLM.weights_version when the request entered it
    weight_changes: list[int] = field(default_factory=list)  # before its samples exist: a 0 per change (see Sequence)

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
    # output positions where newer weights took over (LLM.weights_changed): output token j was sampled by
    # the weights after bisect_right(weight_changes, j) changes
    weight_changes: list[int] = field(default_factory=list)
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
    """Admission of waiting groups, block growth and preemption under the engine's budgets."""

    def __init__(self, cache: PagedCache, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int = 0) -> None:
        self.cache = cache
        self.allocator: BlockAllocator = cache.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # extra positions written past the end (speculative drafts)
        self.waiting: deque[SequenceGroup] = deque()
        self.prefilling: list[SequenceGroup] = []  # admitted (prompt blocks held) but not yet forked
        self.running: list[Sequence] = []  # oldest first
        self.preempted: list[Sequence] = []  # blocks freed, waiting to be recomputed; oldest first
        self.retired: list[Sequence] = []  # finished since the last take_retired()
        self.num_preemptions = 0

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.cache.block_size)

    def _step_blocks(self, seq: Sequence) -> int:
        """Blocks a sequence needs to take one step: positions 0 .. length - 1 + lookahead."""
        return self._blocks(seq.length + self.lookahead)

    def _prefill_blocks(self, group: SequenceGroup) -> int:
        """Blocks a group's admission takes: its prompt, the per-sample copies of a partial last block."""
        P = group.prompt_len
        return self._blocks(P) + (group.params.n - 1 if P % self.cache.block_size else 0)

    def add(self, group: SequenceGroup) -> None:
        usable = self.allocator.num_blocks - 1
        longest = self._blocks(group.prompt_len + group.params.max_tokens + self.lookahead)
        if longest > usable or self._prefill_blocks(group) + group.params.n > usable:
            raise ValueError(
                f"request {group.request_id} needs {max(longest, self._prefill_blocks(group) + group.params.n)} "
                f"cache blocks (prompt {group.prompt_len} + max_tokens {group.params.max_tokens}, "
                f"n={group.params.n}) but the cache has {usable}; raise num_blocks or lower max_tokens / n")
        if group.params.n > self.max_num_seqs:
            raise ValueError(f"n={group.params.n} exceeds max_num_seqs={self.max_num_seqs}")
        if group.prompt_len > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {group.prompt_len} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}")
        if group.prompt_len == 0:
            raise ValueError(f"request {group.request_id} has an empty prompt")
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.preempted)

    def abort(self) -> None:
        """Drop all work and free every block it holds (after an error mid-step)."""
        self.retire(list(self.running))
        for group in self.prefilling:
            self.allocator.free(group.prompt_blocks)
            group.prompt_blocks = []
        self.prefilling.clear()
        self.waiting.clear()
        self.preempted.clear()
        self.retired.clear()

    def admit(self) -> tuple[list[SequenceGroup], list[Sequence]]:
        """What to prefill now: new groups (their prompt blocks allocated) and preempted sequences to
        recompute (their blocks for all tokens but the newest allocated). Preempted sequences go first;
        new groups only enter once none is left waiting. The first row always fits the token budget."""
        admitted: list[SequenceGroup] = []
        resumed: list[Sequence] = []
        num_seqs = len(self.running)
        free = self.allocator.num_free - len(self.running)  # keep one block of growth per running sequence
        rows, longest = 0, 0

        def fits(tokens: int, seqs: int, blocks: int) -> bool:
            padded = max(longest, tokens) * (rows + 1)
            return (num_seqs + seqs <= self.max_num_seqs and blocks <= free
                    and (rows == 0 or padded <= self.max_num_batched_tokens))

        while self.preempted:
            seq = self.preempted[0]
            if not fits(seq.length - 1, 1, self._step_blocks(seq)):
                break
            self.preempted.pop(0)
            seq.blocks = [self.allocator.allocate() for _ in range(self._blocks(seq.length - 1))]
            resumed.append(seq)  # running from now on, so an error in its prefill still frees its blocks
            num_seqs, free, rows = num_seqs + 1, free - self._step_blocks(seq), rows + 1
            longest = max(longest, seq.length - 1)
        while self.waiting and not self.preempted:
            group = self.waiting[0]
            need = self._prefill_blocks(group) + group.params.n
            if not fits(group.prompt_len, group.params.n, need):
                break
            self.waiting.popleft()
            group.prompt_blocks = [self.allocator.allocate() for _ in range(self._blocks(group.prompt_len))]
            self.prefilling.append(group)
            admitted.append(group)
            num_seqs, free, rows = num_seqs + group.params.n, free - need, rows + 1
            longest = max(longest, group.prompt_len)
        if resumed:
            self.running = sorted(self.running + resumed, key=_age)
        return admitted, resumed

    def fork(self, group: SequenceGroup) -> list[Sequence]:
        """The group's n sequences after its prefill: full prompt blocks shared, the partial last
        block copied for all but the first sample."""
        bs = self.cache.block_size
        P = group.prompt_len
        full = P // bs
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
            seq = Sequence(group=group, index=i, stream=RandomStream(group.seeds[i]), blocks=blocks,
                           num_cached=P, weight_changes=list(group.weight_changes))
            seqs.append(seq)
        group.seqs = seqs
        self.prefilling.remove(group)
        self.running.extend(seqs)
        return seqs

    def grow(self) -> None:
        """Give every running sequence the blocks its next step writes, oldest first; when the cache is
        full, preempt the youngest running sequences (possibly the one being grown) to make room."""
        needs = [self._step_blocks(seq) - len(seq.blocks) for seq in self.running]
        if sum(n for n in needs if n > 0) <= self.allocator.num_free:  # room for all: nobody is preempted
            for seq, need in zip(self.running, needs):
                if need > 0:
                    seq.blocks += [self.allocator.allocate() for _ in range(need)]
            self.running.sort(key=_age)
            return
        queue = sorted(self.running, key=_age)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            need = self._step_blocks(seq) - len(seq.blocks)
            while need > self.allocator.num_free and queue:
                self._preempt(queue.pop())
            if need > self.allocator.num_free:
                self._preempt(seq)
                continue
            seq.blocks += [self.allocator.allocate() for _ in range(max(0, need))]
            kept.append(seq)
        self.running = kept

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_cached, seq.pending_hidden = [], 0, None
        self.preempted = sorted(self.preempted + [seq], key=_age)
        self.num_preemptions += 1

    def retire(self, done: list[Sequence]) -> None:
        """Drop finished sequences from the running set and free their blocks."""
        if not done:
            return
        gone = set(map(id, done))
        self.running = [s for s in self.running if id(s) not in gone]
        for seq in done:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        self.retired.extend(done)

    def take_retired(self) -> list[Sequence]:
        """The sequences finished since the last call (so a caller checks only their groups)."""
        out, self.retired = self.retired, []
        return out


def _age(seq: Sequence) -> tuple[int, int]:
    """Scheduling priority: earlier requests first, then lower sample index."""
    return seq.group.request_id, seq.index
