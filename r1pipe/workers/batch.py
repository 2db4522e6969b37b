"""The rollout batch as the trainer sees it: right-padded prompt+completion rows and masks.

Row i is prompt_i + completion_i + padding. Position t's logits predict token t+1, so the
per-token tensors (log-probs, masks) are [B, S-1] and `response_mask[i, t]` is 1 when token t+1
of row i is a completion token. Right padding keeps positions 0..len-1 for every row, exactly
what the engine used, and causal attention never lets a real token see the padding after it.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] bool, True on real tokens
    response_mask: Tensor  # [B, S-1] float: 1 where the target token is a completion token
    routing: list[Tensor] | None = None  # per MoE layer [B, S, top_k] (routing replay) or None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor | slice) -> "TrainBatch":
        routing = None if self.routing is None else [r[index] for r in self.routing]
        return TrainBatch(self.input_ids[index], self.attention_mask[index], self.response_mask[index], routing)

    def trimmed(self, multiple: int = 1) -> "TrainBatch":
        """The same rows cut to their longest one, rounded up to a multiple of `multiple` (at most the
        current width): padding columns that every row has are dropped (right padding: the real tokens'
        positions and results do not change). A multiple > 1 keeps the set of shapes small for backends
        that compile a kernel per shape (oneDNN bf16 on CPU)."""
        S = self.input_ids.shape[1]
        longest = max(2, int(self.attention_mask.sum(1).max())) if len(self) else S
        width = min(S, -(-longest // multiple) * multiple)
        if width == S:
            return self
        routing = None if self.routing is None else [r[:, :width] for r in self.routing]
        return TrainBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.response_mask[:, : width - 1],
                          routing)


def by_length(batch: TrainBatch) -> Tensor:
    """Row indices, longest row first (ties in row order): cut into consecutive micro-batches, each
    holds rows of similar length and pads only to its own longest (TrainBatch.trimmed)."""
    return torch.argsort(batch.attention_mask.sum(1), descending=True, stable=True)


def build_batch(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    routing: list[Tensor] | None = None,
) -> TrainBatch:
    """Pack rows; `routing` (optional) is one LongTensor[num_moe_layers, P_i + C_i, top_k] per row."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], dtype=torch.long)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    seq_len = int(lengths.max())
    batch = len(lengths)
    columns = torch.arange(seq_len)
    attention_mask = columns < lengths[:, None]
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    input_ids[attention_mask] = torch.tensor([t for p, c in zip(prompt_ids, completion_ids) for t in (*p, *c)],
                                             dtype=torch.long)  # row-major: each row's tokens in order
    targets = columns[:-1]
    response_mask = ((targets >= prompt_lens[:, None] - 1) & (targets < lengths[:, None] - 1)).float()
    replay = None
    if routing is not None:
        layers, _, top_k = routing[0].shape
        replay = [torch.zeros(batch, seq_len, top_k, dtype=torch.long) for _ in range(layers)]
        for i, r in enumerate(routing):
            for layer in range(layers):
                replay[layer][i, : r.shape[1]] = r[layer]
    return TrainBatch(input_ids, attention_mask, response_mask, replay)


def pad_per_token(values: list[list[float]], prompt_lens: list[int], shape: tuple[int, int]) -> Tensor:
    """Engine per-completion-token values (e.g. log-probs) placed on the [B, S-1] target grid."""
    start = torch.tensor([p - 1 for p in prompt_lens], dtype=torch.long)[:, None]
    end = start + torch.tensor([len(v) for v in values], dtype=torch.long)[:, None]
    columns = torch.arange(shape[1])
    out = torch.zeros(shape)
    out[(columns >= start) & (columns < end)] = torch.tensor([x for v in values for x in v], dtype=torch.float32)
    return out


@dataclass
class DraftStats:
    """MTP self-speculation counts over some engine steps: drafts proposed and accepted, all of them
    and the first draft of each step alone (later drafts chain the drafter's own hidden state)."""

    drafts: int = 0
    accepted: int = 0
    first_drafts: int = 0
    first_accepted: int = 0

    def __add__(self, other: "DraftStats") -> "DraftStats":
        return DraftStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __sub__(self, other: "DraftStats") -> "DraftStats":
        return DraftStats(*(a - b for a, b in zip(astuple(self), astuple(other))))

    @property
    def acceptance(self) -> float:
        """Accepted / proposed, every draft position."""
        return self.accepted / max(self.drafts, 1)

    @property
    def first_acceptance(self) -> float:
        """Accepted / proposed, first draft of each step (the MTP module on the main model's hidden state)."""
        return self.first_accepted / max(self.first_drafts, 1)

    @property
    def chained_acceptance(self) -> float:
        """Accepted / proposed, the later drafts (each one is proposed whatever happens to the earlier ones)."""
        return (self.accepted - self.first_accepted) / max(self.drafts - self.first_drafts, 1)


@dataclass
class Completion:
    """One sampled completion of a prompt, as the rollout engine returned it, plus its reward."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str  # with the stop string that ended it (the engine cuts it; the rewards need it)
    logprobs: list[float]  # the engine's log-prob of each token in token_ids
    finish_reason: str  # "stop" | "length"
    routing: Tensor | None = None  # LongTensor[num_moe_layers, P + C, top_k] for routing replay, or None
    reward: float = 0.0
    version: int = 0  # the policy version (weight syncs so far) the engine sampled it with

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    """One GRPO step's rollouts: the kept groups (group_size consecutive completions per problem)
    and what was seen on the way there (every scored completion, including dropped groups)."""

    problems: list[dict]  # one per kept group
    completions: list[Completion]  # len(problems) * group_size, rewards filled in
    all_rewards: list[float] = field(default_factory=list)  # every scored completion's total reward
    components: dict[str, list[float]] = field(default_factory=dict)  # every scored completion's reward parts
    domains: list[str] = field(default_factory=list)  # every scored completion's row domain (math, code, ...)
    solved: list[bool] = field(default_factory=list)  # ... and whether its row's grader passed it
    reward_errors: int = 0
    groups_seen: int = 0
    generated_tokens: int = 0

    def __len__(self) -> int:
        return len(self.completions)

    def train_batch(self, pad_id: int, with_routing: bool = False) -> TrainBatch:
        """The rows for the trainer; routing replay when asked for and every completion has it."""
        routing = None
        if with_routing and all(c.routing is not None for c in self.completions):
            routing = [c.routing for c in self.completions]
        return build_batch([c.prompt_ids for c in self.completions], [c.token_ids for c in self.completions], pad_id, routing)

    def engine_logprobs(self, shape: tuple[int, int]) -> Tensor:
        """The engine's log-probs on the trainer's [B, S-1] target grid (0 off the completions)."""
        return pad_per_token([c.logprobs for c in self.completions], [len(c.prompt_ids) for c in self.completions], shape)
