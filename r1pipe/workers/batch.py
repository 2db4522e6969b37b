"""Rollouts as the GRPO stage holds them: completions, their rewards and policy versions, and the step's
batch, which becomes the trainer's TrainBatch (r1pipe.data.batch: prompt + completion rows, the
completion tokens as targets).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor

from r1pipe.data.batch import TrainBatch, build_batch


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
    text: str  # up to and including the stop string that ended it (the rewards read it)
    logprobs: list[float]  # the engine's log-prob of each token in token_ids
    finish_reason: str  # "stop" | "length"
    routing: Tensor | None = None  # LongTensor[num_moe_layers, P + C, top_k] for routing replay, or None
    reward: float = 0.0
    version: int = 0  # the policy version (weight syncs so far) the engines had when it was asked for
    # the policy version that sampled each token (later than `version` past a sync that landed mid-generation:
    # partial rollouts); None where the engine does not record it (vLLM)
    token_versions: list[int] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def versions(self) -> list[int]:
        """The policy version of each token (token_versions, else `version` for all); one for an empty completion."""
        if self.token_versions:
            return list(self.token_versions)
        return [self.version] * max(len(self.token_ids), 1)


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
