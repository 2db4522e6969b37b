"""Optional vLLM backend behind the same interface (GPU clusters; vLLM loads our deepseek_v3 checkpoints).

vllm is imported only when a VLLMEngine is built: it needs a CUDA GPU and `pip install r1pipe[vllm]`, and is
never part of CPU CI. Differences from r1pipe's own engine: no routing records (return_routing raises), and
log-probs follow vLLM's `logprobs_mode` (set "processed_logprobs" so they are taken after temperature, like
ours); weight updates go through vLLM's own loader on every worker.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:  # a clear message instead of a bare ModuleNotFoundError deep in a worker
        raise ImportError("the vLLM backend needs vllm and a CUDA GPU: pip install 'r1pipe[vllm]' "
                          "(use r1pipe.engine.LLM on CPU)") from err
    return vllm


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker (collective_rpc)."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMEngine:
    """generate / update_weights / tokenizer like r1pipe.engine.LLM, on vllm.LLM."""

    def __init__(self, model: str | Path, tokenizer: Any = None, dtype: torch.dtype | str = "bfloat16",
                 seed: int = 0, max_num_seqs: int = 256, speculative_k: int = 0, **vllm_kwargs: Any) -> None:
        vllm = _import_vllm()
        if speculative_k:
            vllm_kwargs.setdefault("speculative_config", {"method": "deepseek_mtp",
                                                          "num_speculative_tokens": speculative_k})
        vllm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        dtype_name = str(dtype).replace("torch.", "")
        self._vllm = vllm
        self._llm = vllm.LLM(model=str(model), tokenizer=None if tokenizer is None else str(tokenizer),
                             dtype=dtype_name, seed=seed, max_num_seqs=max_num_seqs, **vllm_kwargs)
        self.tokenizer = self._llm.get_tokenizer()

    def _params(self, p: SamplingParams) -> Any:
        if p.return_routing:
            raise NotImplementedError("routing records need r1pipe's own engine (r1pipe.engine.LLM)")
        return self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
            stop=p.stop, stop_token_ids=p.stop_token_ids, seed=p.seed, logprobs=0 if p.logprobs else None,
            ignore_eos=p.ignore_eos, skip_special_tokens=p.skip_special_tokens)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams], use_tqdm: bool = True) -> list[RequestOutput]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        results = self._llm.generate(inputs, [self._params(p) for p in plist], use_tqdm=use_tqdm)
        outputs = []
        for i, (r, p) in enumerate(zip(results, plist)):
            comps = []
            for c in r.outputs:
                lps = None
                if p.logprobs and c.logprobs is not None:
                    lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
                comps.append(CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids), logprobs=lps,
                                              finish_reason=c.finish_reason or "length",
                                              stop_reason=c.stop_reason))
            outputs.append(RequestOutput(request_id=i, prompt=r.prompt, prompt_token_ids=list(r.prompt_token_ids),
                                         outputs=comps))
        return outputs

    def update_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        items = list(weights.items()) if isinstance(weights, dict) else list(weights)
        self._llm.collective_rpc(_load_weights, args=(items,))
        self._llm.reset_prefix_cache()
        return len(items)
