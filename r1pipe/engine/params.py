"""Request parameters and results of the rollout engine, shaped like vLLM's offline API."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample the completions of one prompt.

    temperature=0 means greedy. Log-probs are always log_softmax(logits / T) of the sampled token
    with T the sampling temperature (T = 1 when greedy); top-p/top-k only shape which token is drawn.
    Stop strings end a completion when its text contains them: the text ends before the first stop
    string, or right after it with include_stop_str_in_output (never with what followed it in the
    last token); the token ids keep the token that completed it, as vLLM does. Stop token ids and
    the tokenizer's EOS (unless ignore_eos) end it with that token kept.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: bool = True
    return_routing: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop and any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class CompletionOutput:
    """One completion. routing[l, j] are the experts MoE layer l chose for completion token j when
    it was fed to the model; torch.cat([RequestOutput.prompt_routing, routing], 1) replays the whole
    sequence through model(prompt + token_ids, routing=...). weight_changes: the output positions where
    newer weights took over while it was generated (r1pipe.engine.LLM.weights_changed), so token j was
    sampled by version RequestOutput.weights_version + bisect_right(weight_changes, j); None from an engine
    that does not record them (vLLM)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"
    routing: torch.Tensor | None = None  # LongTensor[num_moe_layers, len(token_ids), top_k]
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    weight_changes: list[int] | None = None  # nondecreasing output positions


@dataclass
class RequestOutput:
    """All n completions of one prompt."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_routing: torch.Tensor | None = None  # LongTensor[num_moe_layers, len(prompt), top_k]
    finished: bool = True
    weights_version: int = 0  # the engine's LLM.weights_version when the request entered it


def pair_requests(prompts, params: "SamplingParams | list[SamplingParams] | None") -> tuple[list, list[SamplingParams]]:
    """generate()'s arguments as two equal lists: one prompt (text or token ids) may stand alone, one
    SamplingParams serves every prompt; a list of params must match the prompts one to one."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = params or SamplingParams()
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
    return list(prompts), plist
