"""RolloutWorker: the generation engine (r1pipe.engine.LLM) as a Ray actor.

It samples `n` completions per prompt with their per-token log-probs (and, for routing replay,
the experts the engine chose), and takes new weights from the policy after every step.
Results travel as plain dicts so the controller needs no engine types.
"""
from __future__ import annotations

from typing import Any

import torch


class RolloutWorker:
    def __init__(self, model_path: str, engine_kwargs: dict[str, Any] | None = None, seed: int = 0, num_threads: int = 1):
        from r1pipe.engine import LLM

        torch.set_num_threads(num_threads)
        self.llm = LLM(model_path, seed=seed, **(engine_kwargs or {}))

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        max_tokens: int,
        seeds: list[int] | None = None,
        top_p: float = 1.0,
        top_k: int = -1,
        stop: list[str] | None = None,
        return_routing: bool = False,
    ) -> list[dict[str, Any]]:
        """One dict per prompt: prompt_token_ids, prompt_routing, completions (token_ids, text,
        logprobs, finish_reason, routing). `seeds` (one per prompt) make sampling reproducible."""
        from r1pipe.engine import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_tokens=max_tokens,
                stop=stop,
                seed=None if seeds is None else seeds[i],
                logprobs=True,
                return_routing=return_routing,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            {
                "prompt_token_ids": list(out.prompt_token_ids),
                "prompt_routing": getattr(out, "prompt_routing", None),
                "completions": [
                    {
                        "token_ids": list(c.token_ids),
                        "text": c.text,
                        "logprobs": list(c.logprobs) if c.logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        # the engine cuts a stop string from the text (as vLLM does); the rewards need it back
                        "text_with_stop": c.text + (c.stop_reason if isinstance(getattr(c, "stop_reason", None), str) else ""),
                        "routing": c.routing,
                    }
                    for c in sorted(out.outputs, key=lambda c: c.index)
                ],
            }
            for out in outputs
        ]

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.llm.update_weights(state_dict)

    def pad_token_id(self) -> int:
        """Padding id for training batches (any valid id: padded positions are masked out)."""
        c = self.llm.config
        for candidate in (c.pad_token_id, c.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0
