"""The fake vllm's sampling parameters (vllm.sampling_params in vLLM): the fields r1pipe sets."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off, as in vLLM
    max_tokens: int | None = 16
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text (not what follows)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None  # the sampled token's log-prob and this many top ones; None: no log-probs
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < -1:
            raise ValueError(f"invalid SamplingParams {self}")
