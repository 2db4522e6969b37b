"""Shared-prompt packing: the rows of a GRPO group share their prompt, so the trainer runs it once.

Row b of a TrainBatch is prompt_b + completion_b + padding. Rows with the same prompt (a group's
samples) become one packed row: the prompt once, then each row's completion, each completion
at the positions it had in its own row. The attention pattern keeps every token's view as it
was: a prompt token sees the prompt up to itself, a completion token sees the whole prompt and
its own completion up to itself, never another row's completion (r1pipe.model.SharedPrefix: the
prompts attend among themselves and each completion over [its prompt, itself], so attention does
the unpacked rows' work, not the packed row's square). Each token's hidden states, and
so the log-prob of every completion token, are those of the unpacked rows (up to float summation
order), and autograd sums the gradient reaching a shared prompt token over the rows that read it.

What it saves is the prompt's forward and backward for all but one row of each group (the R1-Zero
recipe's 10-token prompts under 21-token completions: 28% of the tokens; long prompts, most of them).
The prompt's keys and values are copied to each of its completions' attention, a small price.

Only the log-probs of targets (response_mask > 0) are computed: the prompt's own next-token
log-probs are never used by the loss. Expert loads count each packed token as many times as rows
it stands for (`token_weight`), so the router's balancing sees the same loads as unpacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r1pipe.model import SharedPrefix
from r1pipe.data.batch import TrainBatch


@dataclass
class PackedBatch:
    """G packed rows of width L standing for B rows of width S; N targets (completion tokens to score)."""

    input_ids: Tensor  # [G, L] long
    positions: Tensor  # [G, L] long: each token's position in its own row
    token_weight: Tensor  # [G, L] float: rows the token stands for (0: padding)
    prefix: SharedPrefix  # the attention pattern: prompts among themselves, completions over prompt + own
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


def prompt_groups(batch: TrainBatch, plens: list[int] | None = None) -> list[list[int]]:
    """Row indices grouped by identical prompt (token ids, and the replayed routing of the prompt when the
    batch has one), groups in order of first appearance, rows in order; `plens`: prompt_lengths(batch)."""
    plens = prompt_lengths(batch) if plens is None else plens
    ids = batch.input_ids.tolist()
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(plens):
        key: tuple = (tuple(ids[b][:p]),)
        if batch.routing is not None:
            key += tuple(r[b, :p].numpy().tobytes() for r in batch.routing)
        groups.setdefault(key, []).append(b)
    return list(groups.values())


def pack_shared_prompts(batch: TrainBatch, multiple: int = 1) -> PackedBatch:
    """Pack `batch` (see the module docstring); the packed width is rounded up to `multiple`."""
    B, S = batch.input_ids.shape
    device = batch.input_ids.device
    ids = batch.input_ids.tolist()
    lengths = [int(n) for n in batch.attention_mask.sum(1).tolist()]
    plens = prompt_lengths(batch)
    groups = prompt_groups(batch, plens)
    packed_ids: list[list[int]] = []
    packed_pos: list[list[int]] = []
    packed_weight: list[list[float]] = []
    origin: list[list[tuple[int, int]]] = []  # per packed row: (row, column) each token comes from
    completions: list[tuple[int, int, int, int]] = []  # (packed row, start in it, length, batch row)
    for g, rows in enumerate(groups):
        p = plens[rows[0]]
        packed_ids.append(ids[rows[0]][:p])
        packed_pos.append(list(range(p)))
        packed_weight.append([float(len(rows))] * p)
        origin.append([(rows[0], t) for t in range(p)])
        for b in rows:
            n = lengths[b]
            if n > p:
                completions.append((g, len(packed_ids[g]), n - p, b))
            packed_ids[g] += ids[b][p:n]
            packed_pos[g] += range(p, n)
            packed_weight[g] += [1.0] * (n - p)
            origin[g] += [(b, t) for t in range(p, n)]
    G = len(groups)
    L = -(-max(len(r) for r in packed_ids) // multiple) * multiple
    pad = lambda rows, value: [r + [value] * (L - len(r)) for r in rows]  # noqa: E731
    long = dict(dtype=torch.long, device=device)
    input_ids = torch.tensor(pad(packed_ids, 0), **long)
    positions = torch.tensor(pad(packed_pos, 0), **long)
    weight = torch.tensor(pad(packed_weight, 0.0), dtype=torch.float32, device=device)

    packed_index: dict[tuple[int, int], int] = {}  # (row b, column t) -> flat packed index of that token
    for g, rows in enumerate(groups):
        for i, (b, t) in enumerate(origin[g]):
            packed_index[(b, t)] = g * L + i
        for b in rows[1:]:  # the shared prompt stands for every row's copy of it
            for t in range(plens[b]):
                packed_index[(b, t)] = packed_index[(rows[0], t)]
    targets = (batch.response_mask > 0).nonzero().tolist()  # (b, t): token t+1 of row b, predicted at t
    source = torch.tensor([packed_index[(b, t)] for b, t in targets], **long)
    target = torch.tensor([ids[b][t + 1] for b, t in targets], **long)
    scatter = torch.tensor([b * (S - 1) + t for b, t in targets], **long)

    routing = None
    if batch.routing is not None:
        # the flat [B*S] index each packed token copies (padding: 0)
        copies = torch.tensor(pad([[b * S + t for b, t in row] for row in origin], 0), **long).view(-1)
        routing = [r.reshape(B * S, -1).index_select(0, copies).view(G, L, -1) for r in batch.routing]
    prefix = shared_prefix([plens[rows[0]] for rows in groups], completions, L, device)
    return PackedBatch(input_ids, positions, weight, prefix, source, target, scatter, (B, S - 1), routing)


def shared_prefix(prompt_lens: list[int], completions: list[tuple[int, int, int, int]], L: int,
                  device: torch.device) -> SharedPrefix:
    """The attention layout of packed rows: prompt g is the first prompt_lens[g] tokens of packed row g; each
    completion (packed row, start, length, _) follows it there. Padding queries attend key 0 (a prompt token,
    so softmax stays finite); their outputs are dropped."""
    G, P = len(prompt_lens), max(prompt_lens)
    p = torch.tensor(prompt_lens, device=device)
    slot = torch.arange(P, device=device)
    prompt_valid = slot[None, :] < p[:, None]  # [G, P]
    prompt_index = (torch.arange(G, device=device)[:, None] * L + slot[None, :]) * prompt_valid
    causal = slot[None, :, None] >= slot[None, None, :]  # query >= key
    prompt_mask = causal & prompt_valid[:, None, :]
    prompt_mask[:, :, 0] = True
    N = len(completions)
    C = max((c for _, _, c, _ in completions), default=1)
    group = torch.tensor([g for g, _, _, _ in completions], dtype=torch.long, device=device)
    start = torch.tensor([g * L + s for g, s, _, _ in completions], dtype=torch.long, device=device)
    length = torch.tensor([c for _, _, c, _ in completions], dtype=torch.long, device=device)
    col = torch.arange(C, device=device)
    row_valid = col[None, :] < length[:, None]  # [N, C]
    row_index = (start[:, None] + col[None, :]) * row_valid
    own = (col[None, :, None] >= col[None, None, :]) & row_valid[:, None, :]  # [N, C, C]
    row_mask = torch.cat([prompt_valid.index_select(0, group)[:, None, :].expand(N, C, P), own], dim=2)
    row_mask[:, :, 0] = True
    return SharedPrefix(
        prompt_index=prompt_index, prompt_mask=prompt_mask,
        prompt_take=prompt_valid.reshape(-1).nonzero().squeeze(1), prompt_dest=prompt_index[prompt_valid],
        row_index=row_index, row_group=group, row_mask=row_mask,
        row_take=row_valid.reshape(-1).nonzero().squeeze(1), row_dest=row_index[row_valid])


def by_prompt(batch: TrainBatch) -> Tensor:
    """Row indices with the rows of each prompt group together (groups with the most tokens first, rows
    longest first inside): cut into consecutive micro-batches, a group stays in one unless it is larger."""
    lengths = batch.attention_mask.sum(1).tolist()
    groups = prompt_groups(batch)
    groups.sort(key=lambda rows: -sum(lengths[b] for b in rows))  # stable: ties keep their order
    return torch.tensor([b for rows in groups for b in sorted(rows, key=lambda b: -lengths[b])], dtype=torch.long)
