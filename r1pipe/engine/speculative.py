"""Self-speculative decoding with the model's own MTP module as the drafter.

A step: (1) the MTP module catches up on the positions whose main-model hidden state and next token are
now known (writing its own cache layer) and drafts d_1 from the newest one; further drafts chain its own
output hidden state one position on (the EAGLE-style recurrence; drafts are only proposals). (2) One
main-model forward verifies [x_last, d_1..d_k]. (3) The standard rejection rule keeps d_j with probability
min(1, p(d_j) / q(d_j)) and, at the first rejection, draws from normalise(max(p - q, 0)) (or from p after
all k were kept), so the output distribution is exactly the target's; with greedy sampling the output is
exactly the non-speculative argmax sequence. Rejected positions stay in the cache past the sequence's
length, masked out and overwritten later.
"""
from __future__ import annotations

import torch

from r1pipe.engine.decoding import PlainDecoding
from r1pipe.engine.lockstep import Lockstep
from r1pipe.engine.runner import Batch, ModelRunner
from r1pipe.engine.sampler import draw, sampling_probs, token_logprobs, uniforms
from r1pipe.engine.scheduler import Sequence
from r1pipe.engine.stopping import StopChecker


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: torch.Tensor,
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative-sampling rule, batched.

    target_probs [B, K+1, V] (p at each verified position), draft_probs [B, K, V] (q each draft was drawn
    from), drafts [B, K], u [B, K+1] uniforms. Returns (accepted count a [B], the token drawn at index a [B]).
    """
    B, K = drafts.shape
    p_d = target_probs[:, :K].gather(-1, drafts.unsqueeze(-1)).squeeze(-1).double()
    q_d = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1).double()
    accept = u[:, :K] * q_d < p_d  # u < p/q without dividing by q
    accepted = accept.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=drafts.device)
    p_a = target_probs[rows, accepted]
    q_full = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_a - q_full[rows, accepted]).clamp_(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)
    return accepted, draw(residual, u[:, K])


class SpeculativeDecoding(PlainDecoding):
    """k MTP drafts per sequence and step, verified in one main-model forward."""

    def __init__(self, runner: ModelRunner, stopper: StopChecker, vocab_size: int, stats: dict[str, int],
                 k: int, lockstep: Lockstep | None = None) -> None:
        super().__init__(runner, stopper, vocab_size, stats, lockstep)
        self.k = self.lookahead = k

    def after_prefill(self, batch: Batch, out, lens: list[int]) -> None:
        """Fill the MTP cache layer for positions 0..len-2 of each prefilled row (their next tokens are known);
        a prompt's blocks, this layer included, are then shared or copied by its group's samples."""
        if max(lens) < 2:
            return
        S = max(lens) - 1
        lens_t = torch.tensor(lens)
        valid = torch.arange(S).unsqueeze(0) < (lens_t - 1).unsqueeze(1)
        positions = torch.arange(S).expand(len(lens), S) * valid
        self.runner.mtp(out.hidden[:, :S], Batch(batch.ids[:, 1:S + 1], positions, valid, batch.tables))

    def attach(self, out, lens: list[int], rows: list[tuple[int, Sequence]]) -> None:
        """Each continuing sequence keeps the main hidden state of its row's last position, whose next token
        is sampled now (or known, when resumed), for the MTP module to catch up on."""
        for r, seq in rows:
            seq.pending_hidden = out.hidden[r, lens[r] - 1].unsqueeze(0)

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Draft, verify and accept for every running sequence at once; returns the sequences now finished."""
        K, device = self.k, self.device
        live = [s for s in seqs if not s.finished]
        drafts = torch.zeros(len(seqs), K, dtype=torch.long, device=device)
        draft_probs = None
        index = torch.tensor([i for i, s in enumerate(seqs) if not s.finished], dtype=torch.long, device=device)
        if live:
            live_drafts, draft_probs = self._draft(live)
            drafts[index] = live_drafts
        # verify [x_last, d_1..d_K] in one forward; finished rows only feed x_last (their routing record)
        ids = torch.cat([torch.tensor([[s.last_token()] for s in seqs], device=device), drafts], dim=1)
        start = torch.tensor([s.length - 1 for s in seqs])
        valid = torch.tensor([not s.finished for s in seqs]).unsqueeze(1) | (torch.arange(K + 1) == 0)
        positions = (start.unsqueeze(1) + torch.arange(K + 1)) * valid
        want_routing = any(s.params.return_routing for s in seqs)
        out = self.runner.forward(Batch(ids.cpu(), positions, valid, [s.blocks for s in seqs]), want_routing)
        routing = torch.stack(out.routing).cpu() if want_routing else None  # [layers, B, K+1, k]
        kept = {}  # fed tokens whose routing is valid: x_last and the accepted drafts
        if live:
            accepted = self._accept(live, out.logits[index], out.hidden[index], drafts[index], draft_probs)
            kept = {id(s): a + 1 for s, a in zip(live, accepted)}
        if routing is not None:
            for b, s in enumerate(seqs):
                if s.params.return_routing:
                    fed = min(kept.get(id(s), 1), len(s.output_ids) - len(s.routing))
                    s.routing.extend(routing[:, b, j] for j in range(fed))
        for s in seqs:
            s.awaiting_final_feed = s.finished and s.params.return_routing and len(s.routing) < len(s.output_ids)
        return [s for s in seqs if s.finished and not s.awaiting_final_feed]

    def _draft(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K draft tokens per sequence and the distributions they were drawn from: [B, K], [B, K, V]
        (None when every row is greedy)."""
        K, device = self.k, self.device
        B = len(seqs)
        m = [s.pending_hidden.shape[0] for s in seqs]  # type: ignore[union-attr]
        M = max(m)
        D = seqs[0].pending_hidden.shape[-1]  # type: ignore[union-attr]
        hidden = torch.zeros(B, M, D, dtype=seqs[0].pending_hidden.dtype, device=device)  # type: ignore[union-attr]
        next_ids = torch.zeros(B, M, dtype=torch.long)
        positions = torch.zeros(B, M, dtype=torch.long)
        valid = torch.zeros(B, M, dtype=torch.bool)
        for b, (s, n) in enumerate(zip(seqs, m)):
            first = s.length - 1 - n  # position of the oldest pending hidden state
            hidden[b, :n] = s.pending_hidden
            next_ids[b, :n] = torch.tensor([s.token_at(p + 1) for p in range(first, first + n)])
            positions[b, :n] = torch.arange(first, first + n)
            valid[b, :n] = True
            s.pending_hidden = None
        tables = [s.blocks for s in seqs]
        h, logits = self.runner.mtp(hidden, Batch(next_ids, positions, valid, tables))
        rows = torch.arange(B, device=device)
        last = torch.tensor(m, device=device) - 1
        h, logits = h[rows, last].unsqueeze(1), logits[rows, last]
        st = self.sampling_tensors(seqs)
        streams = [s.stream for s in seqs]
        tokens, probs = [], []
        pos = torch.tensor([s.length - 2 for s in seqs])
        for j in range(K):
            if st.all_greedy:  # q is one-hot at the argmax: no distribution needed
                d = logits.argmax(-1)
            else:
                q = sampling_probs(logits, st)
                d = draw(q, uniforms(streams).squeeze(-1).to(device))
                probs.append(q)
            tokens.append(d)
            if j + 1 < K:
                pos = pos + 1
                h, logits = self.runner.mtp(h, Batch.decode(d.tolist(), pos.tolist(), tables))
                logits = logits[:, 0]
        return torch.stack(tokens, 1), (torch.stack(probs, 1) if probs else None)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor, hidden: torch.Tensor, drafts: torch.Tensor,
                draft_probs: torch.Tensor | None) -> list[int]:
        """Apply the rejection rule to the verified logits [B, K+1, V], append each row's new tokens and return
        how many drafts each row accepted."""
        B, K1, V = logits.shape
        K = K1 - 1
        st = self.sampling_tensors(seqs)
        st_pos = st.select(torch.arange(B, device=logits.device).repeat_interleave(K1))
        flat = logits.reshape(B * K1, V)
        if draft_probs is None:  # all greedy: the rule reduces to "keep drafts while they equal the argmax"
            new = logits.argmax(-1)
            accepted = (drafts == new[:, :K]).long().cumprod(-1).sum(-1)
        else:
            target = sampling_probs(flat, st_pos).view(B, K1, V)
            u = uniforms([s.stream for s in seqs], K1).to(logits.device)
            accepted, bonus = rejection_sample(target, draft_probs, drafts, u)
            new = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)
            new[torch.arange(B, device=logits.device), accepted] = bonus
        agreed = self.lockstep.agree(torch.cat([new, accepted.unsqueeze(1)], dim=1))  # rank 0's, expert-parallel
        new, accepted = agreed[:, :K1], agreed[:, K1]
        want_lp = any(s.params.logprobs for s in seqs)
        lps = token_logprobs(flat, new.reshape(-1), st_pos).view(B, K1).tolist() if want_lp else None
        self.stats["draft_tokens"] += B * K
        self.stats["accepted_tokens"] += int(accepted.sum())
        self.stats["first_drafts"] += B
        self.stats["first_accepted"] += int((accepted > 0).sum())
        new_list, acc_list = new.tolist(), accepted.tolist()
        for b, s in enumerate(seqs):
            a = acc_list[b]
            for j in range(a + 1):
                self.stopper.append(s, new_list[b][j], lps[b][j] if lps is not None else None)
                if s.finished:
                    break
            s.num_cached = s.length - 1
            s.pending_hidden = hidden[b, : a + 1]
        return acc_list
