"""The optional vLLM backend: vllm.LLM behind r1pipe.engine.LLM's interface (generate with r1pipe's
SamplingParams, RequestOutput results, update_weights), for GPU machines where vllm is installed.

vllm is imported only when a VLLMEngine is built (`pip install 'r1pipe[vllm]'`, CUDA GPU); nothing else in
r1pipe imports it. Differences from r1pipe's own engine: no routing records (return_routing raises).

Log-prob contract: r1pipe's log-probs are the untruncated log_softmax(logits / T) of the sampled token (T the
sampling temperature; top-k/top-p only decide which token is drawn). vLLM is asked for that
(logprobs_mode="processed_logprobs") and, at start-up, `check_logprob_contract` verifies it on a probe: at
the first generated position the top-k log-probs taken at temperature T with top_k=1 must (1) all be finite
(no top-k/top-p mask), (2) differ pairwise by exactly 1/T times their differences at T=1 (temperature
applied before the softmax) and (3) hold at most probability 1 (not renormalised over a kept set).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams, pair_requests


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


class LogprobContractError(RuntimeError):
    """vLLM's log-probs are not the untruncated log_softmax(logits / T) r1pipe's trainer assumes."""


class VLLMEngine:
    """generate / update_weights / tokenizer like r1pipe.engine.LLM, on vllm.LLM.

    check_logprobs: run `check_logprob_contract` once at start-up (raises LogprobContractError)."""

    def __init__(self, model: str | Path, tokenizer: Any = None, dtype: torch.dtype | str = "auto",
                 seed: int = 0, max_num_seqs: int = 256, speculative_k: int = 0, check_logprobs: bool = True,
                 **vllm_kwargs: Any) -> None:
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
        if check_logprobs:
            self.check_logprob_contract()

    def _params(self, p: SamplingParams, top_logprobs: int = 0) -> Any:
        if p.return_routing:
            raise NotImplementedError("routing records need r1pipe's own engine (r1pipe.engine.LLM)")
        return self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output, stop_token_ids=p.stop_token_ids, seed=p.seed,
            logprobs=top_logprobs if p.logprobs else None, ignore_eos=p.ignore_eos,
            skip_special_tokens=p.skip_special_tokens)

    def _raw_generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], plist: list[Any],
                      use_tqdm: bool) -> list[Any]:
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        return self._llm.generate(inputs, plist, use_tqdm=use_tqdm)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; results in prompt order (as r1pipe.engine.LLM.generate)."""
        prompts, plist = pair_requests(prompts, params)
        results = self._raw_generate(prompts, [self._params(p) for p in plist], use_tqdm)
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

    def _first_position_logprobs(self, prompt: list[int], temperature: float, top_k: int, k: int) -> dict[int, float]:
        sp = self._params(SamplingParams(temperature=temperature, top_k=top_k, max_tokens=1, seed=0), top_logprobs=k)
        step = self._raw_generate([prompt], [sp], use_tqdm=False)[0].outputs[0].logprobs[0]
        return {int(t): float(lp.logprob) for t, lp in step.items()}

    def check_logprob_contract(self, prompt: list[int] | None = None, temperature: float = 2.0, k: int = 8,
                               tol: float = 1e-2) -> None:
        """Verify on one probe that log-probs are the untruncated log_softmax(logits / T) (see the module
        docstring); raises LogprobContractError naming what differs. prompt: token ids (default: the
        tokenizer's encoding of a short text)."""
        if prompt is None:
            prompt = list(self.tokenizer.encode("1 + 1 ="))
        base = self._first_position_logprobs(prompt, 1.0, -1, k)
        hot = self._first_position_logprobs(prompt, temperature, 1, k)
        where = (f"vLLM log-probs (logprobs_mode={self._llm_logprobs_mode()!r}) are not the untruncated "
                 f"log_softmax(logits / T) r1pipe's trainer assumes")
        masked = sorted(t for t, lp in hot.items() if not math.isfinite(lp))
        if masked:
            raise LogprobContractError(f"{where}: with top_k=1, tokens {masked[:5]} got -inf (a truncation mask)")
        common = [t for t in hot if t in base]
        if len(common) < 2:
            raise LogprobContractError(f"{where}: the probe returned fewer than 2 comparable top log-probs")
        ref = common[0]
        worst = max(abs((hot[t] - hot[ref]) - (base[t] - base[ref]) / temperature) for t in common[1:])
        if worst > tol:
            raise LogprobContractError(f"{where}: log-prob differences at T={temperature} are not 1/T times those "
                                       f"at T=1 (off by {worst:.3g}): temperature is not applied before the softmax")
        mass = sum(math.exp(lp) for lp in hot.values())
        if mass > 1 + tol:
            raise LogprobContractError(f"{where}: the top log-probs at T={temperature} with top_k=1 hold "
                                       f"probability {mass:.4f}: renormalised over the kept tokens")

    def _llm_logprobs_mode(self) -> Any:
        config = getattr(getattr(self._llm, "llm_engine", None), "model_config", None)
        return getattr(config, "logprobs_mode", "unknown")

    def update_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights on every vLLM worker (vLLM's own loader, HF names); returns how many were sent."""
        items = list(weights.items()) if isinstance(weights, dict) else list(weights)
        self._llm.collective_rpc(_load_weights, args=(items,))
        self._llm.reset_prefix_cache()
        return len(items)
