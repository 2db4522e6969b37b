"""Decoding strategies: what one engine step does for the running sequences, and what it must remember
from a prefill. `PlainDecoding` feeds each sequence's newest token in one batched forward and samples the
next; r1pipe.engine.speculative.SpeculativeDecoding drafts with the MTP module and verifies."""
from __future__ import annotations

import torch

from r1pipe.engine.lockstep import Lockstep
from r1pipe.engine.runner import Batch, ModelRunner
from r1pipe.engine.sampler import SamplingTensors, sample, token_logprobs
from r1pipe.engine.scheduler import Sequence
from r1pipe.engine.stopping import StopChecker


class PlainDecoding:
    """One token per sequence per step."""

    lookahead = 0  # cache positions a step writes past a sequence's newest token

    def __init__(self, runner: ModelRunner, stopper: StopChecker, vocab_size: int, stats: dict[str, int],
                 lockstep: Lockstep | None = None) -> None:
        """`lockstep`: the processes of an expert-parallel engine append its rank 0's tokens."""
        self.runner, self.stopper, self.vocab_size, self.stats = runner, stopper, vocab_size, stats
        self.lockstep = lockstep or Lockstep()
        self.device = runner.device
        self._uniform: dict[tuple, SamplingTensors] = {}  # (rows, temperature, top_p, top_k) -> tensors (read only)

    def after_prefill(self, batch: Batch, out, lens: list[int]) -> None:
        """Called right after a prefill forward over rows of lens[r] tokens, before the prompts' blocks are
        forked into their samples (so what it writes to the cache is shared or copied with them)."""

    def attach(self, out, lens: list[int], rows: list[tuple[int, Sequence]]) -> None:
        """Called with the sequences that continue from row r of the prefill, before their first tokens are
        sampled: (r, seq) for each new sample and each recomputed (resumed) sequence."""

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Feed every running sequence's newest token in one forward (`ModelRunner.decode`: eager, or a CUDA
        graph replay) and sample the next for each; returns the sequences now finished."""
        batch = Batch.decode([s.last_token() for s in seqs], [s.length - 1 for s in seqs], [s.blocks for s in seqs])
        want_routing = any(s.params.return_routing for s in seqs)
        logits, routing = self.runner.decode(batch, want_routing)
        for s in seqs:
            s.num_cached += 1
        if routing is not None:
            self._record_routing(seqs, routing.cpu())  # [layers, B, k]
        live = [i for i, s in enumerate(seqs) if not s.finished]
        if live:
            if len(live) < len(seqs):
                logits = logits[torch.tensor(live, device=self.device)]
            self.sample_and_append([seqs[i] for i in live], logits)
        return [s for s in seqs if s.finished and not s.awaiting_final_feed]

    def _record_routing(self, seqs: list[Sequence], routing: torch.Tensor) -> None:
        """routing [layers, B, k]: the experts each fed output token used."""
        for b, s in enumerate(seqs):
            if s.params.return_routing:
                s.routing.append(routing[:, b])
                s.awaiting_final_feed = False

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        groups = {id(s.group): s.group for s in seqs}  # a group's samples share one SamplingParams
        settings = {(g.params.temperature, g.params.top_p, g.params.top_k) for g in groups.values()}
        if len(settings) == 1:  # the common case: one setting for the whole batch, its tensors made once
            key = (len(seqs), *settings.pop())
            if key not in self._uniform:
                self._uniform[key] = SamplingTensors.uniform(*key, self.vocab_size, self.device)
            return self._uniform[key]
        return SamplingTensors.build([s.params.temperature for s in seqs], [s.params.top_p for s in seqs],
                                     [s.params.top_k for s in seqs], self.vocab_size, self.device)

    def sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Draw one token per row of logits [B, V] from each sequence's own stream and append it."""
        st = self.sampling_tensors(seqs)
        tokens = self.lockstep.agree(sample(logits, st, [s.stream for s in seqs]))
        want_lp = any(s.params.logprobs for s in seqs)
        lps = token_logprobs(logits, tokens, st).tolist() if want_lp else None
        for i, (seq, tok) in enumerate(zip(seqs, tokens.tolist())):
            self.stopper.append(seq, tok, lps[i] if lps is not None else None)
