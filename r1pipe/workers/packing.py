"""Shared-prompt packing: the rows of a GRPO group share their prompt, so the trainer runs it once.

Row b of a TrainBatch is prompt_b + completion_b + padding. Rows with the same prompt (a group's
samples) become one packed row: the prompt once, then each row's completion, each completion
at the positions it had in its own row. The attention pattern keeps every token's view as it
was: a prompt token sees the prompt up to itself, a completion token sees the whole prompt and
its own completion up to itself, never another row's completion. Each token's hidden states, and
so the log-prob of every completion token, are those of the unpacked rows (up to float summation
order), and autograd sums the gradient reaching a shared prompt token over the rows that read it.

What it saves is the prompt's forward and backward for all but one row of each group (the R1-Zero
recipe's 10-token prompts under 21-token completions: 28% of the tokens; long prompts, most of them).
The price is attention over the packed row, quadratic in its length, which stays small beside the
projections and experts at completion lengths of hundreds of tokens.

Only the log-probs of targets (response_mask > 0) are computed: the prompt's own next-token
log-probs are never used by the loss. Expert loads count each packed token as many times as rows
it stands for (`token_weight`), so the router's balancing sees the same loads as unpacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r1pipe.workers.batch import TrainBatch

_PROMPT, _PAD = -1, -2  # owner of a shared prompt token / of padding; completions are owned by their row's slot


@dataclass
class PackedBatch:
    """G packed rows of width L standing for B rows of width S; N targets (completion tokens to score)."""

    input_ids: Tensor  # [G, L] long
    positions: Tensor  # [G, L] long: each token's position in its own row
    token_weight: Tensor  # [G, L] float: rows the token stands for (0: padding)
    attend: Tensor  # [G, L, L] bool: query may attend key
    source: Tensor  # [N] long: flat index into [G*L] of the token whose logits predict each target
    target: Tensor  # [N] long: the target token ids
    scatter: Tensor  # [N] long: flat index of each target into the [B, S-1] grid
    shape: tuple[int, int]  # (B, S-1)
    routing: list[Tensor] | None = None  # per MoE layer [G, L, top_k] (routing replay)

    def unpack(self, values: Tensor) -> Tensor:
        """Per-target values [N] onto the rows' [B, S-1] target grid (0 off the targets); differentiable."""
        flat = values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_put((self.scatter,), values).view(self.shape)


def prompt_lengths(batch: TrainBatch) -> list[int]:
    """Each row's prompt length: up to its first target (response_mask > 0); a row with no target at all
    is all prompt (it still runs, for the expert loads, but shares only with identical rows)."""
    scored = batch.response_mask > 0
    first = scored.float().argmax(1).tolist()
    lengths = batch.attention_mask.sum(1).tolist()
    return [f + 1 if any_ else int(n) for f, any_, n in zip(first, scored.any(1).tolist(), lengths)]


def prompt_groups(batch: TrainBatch, max_rows: int | None = None) -> list[list[int]]:
    """Row indices grouped by identical prompt (token ids, and the replayed routing of the prompt when the
    batch has one), groups in order of first appearance, rows in order."""
    plens = prompt_lengths(batch)
    ids = batch.input_ids.tolist()
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(plens):
        key: tuple = (tuple(ids[b][:p]),)
        if batch.routing is not None:
            key += tuple(r[b, :p].numpy().tobytes() for r in batch.routing)
        groups.setdefault(key, []).append(b)
    out = list(groups.values())
    if max_rows:
        out = [rows[i:i + max_rows] for rows in out for i in range(0, len(rows), max_rows)]
    return out


def pack_shared_prompts(batch: TrainBatch, multiple: int = 1, max_rows: int | None = None) -> PackedBatch:
    """Pack `batch` (see the module docstring); the packed width is rounded up to `multiple`."""
    B, S = batch.input_ids.shape
    device = batch.input_ids.device
    ids = batch.input_ids.tolist()
    lengths = [int(n) for n in batch.attention_mask.sum(1).tolist()]
    plens = prompt_lengths(batch)
    groups = prompt_groups(batch, max_rows)
    rows_ids: list[list[int]] = []  # per packed row: token ids, positions, weights, owners, (row, column) origin
    rows_pos: list[list[int]] = []
    rows_w: list[list[float]] = []
    rows_owner: list[list[int]] = []
    rows_from: list[list[tuple[int, int]]] = []
    packed_index: dict[tuple[int, int], int] = {}  # (row b, column t) -> flat packed index of that token
    for g, rows in enumerate(groups):
        p = plens[rows[0]]
        tok, pos, w, own = ids[rows[0]][:p], list(range(p)), [float(len(rows))] * p, [_PROMPT] * p
        origin = [(rows[0], t) for t in range(p)]
        for slot, b in enumerate(rows):
            n = lengths[b]
            tok += ids[b][p:n]
            pos += range(p, n)
            w += [1.0] * (n - p)
            own += [slot] * (n - p)
            origin += [(b, t) for t in range(p, n)]
        rows_ids.append(tok), rows_pos.append(pos), rows_w.append(w), rows_owner.append(own), rows_from.append(origin)
    L = max(len(r) for r in rows_ids)
    L = -(-L // multiple) * multiple
    G = len(groups)
    for g, rows in enumerate(groups):
        for i, (b, t) in enumerate(rows_from[g]):
            packed_index[(b, t)] = g * L + i
        for b in rows[1:]:  # the shared prompt stands for every row's copy of it
            for t in range(plens[b]):
                packed_index[(b, t)] = packed_index[(rows[0], t)]
    pad = lambda rows, value: [r + [value] * (L - len(r)) for r in rows]  # noqa: E731
    input_ids = torch.tensor(pad(rows_ids, 0), dtype=torch.long, device=device)
    positions = torch.tensor(pad(rows_pos, 0), dtype=torch.long, device=device)
    weight = torch.tensor(pad(rows_w, 0.0), dtype=torch.float32, device=device)
    owner = torch.tensor(pad(rows_owner, _PAD), dtype=torch.long, device=device)
    key_owner, query_owner = owner[:, None, :], owner[:, :, None]
    attend = ((positions[:, None, :] <= positions[:, :, None]) & ((key_owner == _PROMPT) | (key_owner == query_owner))
              & (weight[:, None, :] > 0))

    targets = (batch.response_mask > 0).nonzero().tolist()  # (b, t): token t+1 of row b, predicted at t
    source = torch.tensor([packed_index[(b, t)] for b, t in targets], dtype=torch.long, device=device)
    target = torch.tensor([ids[b][t + 1] for b, t in targets], dtype=torch.long, device=device)
    scatter = torch.tensor([b * (S - 1) + t for b, t in targets], dtype=torch.long, device=device)

    routing = None
    if batch.routing is not None:
        origin = torch.zeros(G * L, dtype=torch.long)  # flat [B*S] index each packed token copies (padding: 0)
        for g in range(G):
            for i, (b, t) in enumerate(rows_from[g]):
                origin[g * L + i] = b * S + t
        origin = origin.to(device)
        routing = [r.reshape(B * S, -1).index_select(0, origin).view(G, L, -1) for r in batch.routing]
    return PackedBatch(input_ids, positions, weight, attend, source, target, scatter, (B, S - 1), routing)


def by_prompt(batch: TrainBatch) -> Tensor:
    """Row indices with the rows of each prompt group together (groups with the most tokens first, rows
    longest first inside): cut into consecutive micro-batches, a group stays in one unless it is larger."""
    lengths = batch.attention_mask.sum(1).tolist()
    groups = prompt_groups(batch)
    groups.sort(key=lambda rows: -sum(lengths[b] for b in rows))  # stable: ties keep their order
    return torch.tensor([b for rows in groups for b in sorted(rows, key=lambda b: -lengths[b])], dtype=torch.long)
