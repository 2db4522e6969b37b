"""The optional vLLM backend: vllm.LLM behind r1pipe.engine.LLM's interface (generate / iter_generate with
r1pipe's SamplingParams, RequestOutput results, update_weights, tokenizer), for GPU machines where vllm is
installed.

vllm is imported only when a VLLMEngine is built (`pip install 'r1pipe[vllm]'`, CUDA GPU); nothing else in
r1pipe imports it. Differences from r1pipe's own engine: no routing records (return_routing raises), no MTP
draft counts, and no log-probs for truncated sampling (top-k / top-p set: vLLM's are renormalised over the
kept tokens, so those completions carry logprobs None).

Log-prob contract: r1pipe's log-probs are the untruncated log_softmax(logits / T) of the sampled token (T the
sampling temperature). vLLM is asked for its processed log-probs (logprobs_mode="processed_logprobs": after
temperature, and after top-k / top-p, which r1pipe's rollouts never set), and at start-up
`check_logprob_contract` verifies them on a probe: at the first generated position the top-k log-probs at
temperature T (no top-k / top-p) must (1) all be finite (no truncation mask), (2) differ pairwise by exactly
1/T times their differences at T=1 (temperature applied before the softmax) and (3) hold at most
probability 1 (normalised over the whole vocabulary, not over a kept set).

Weights: `update_weights` hands (Hugging Face name, tensor) pairs to the model's own `load_weights` on every
vLLM worker (which fuses and shards them as it does when loading a checkpoint), through LLM.collective_rpc
and the worker extension `WeightLoader`.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams, pair_requests
from r1pipe.errors import ConfigError, UserError


def _import_vllm() -> Any:
    try:
        import vllm
        import vllm.sampling_params  # RequestOutputKind, for iter_generate's requests
    except ImportError as err:  # a clear message instead of a bare ModuleNotFoundError deep in a worker
        raise ImportError("the vLLM backend needs vllm and a CUDA GPU: pip install 'r1pipe[vllm]' "
                          "(use r1pipe.engine.LLM on CPU)") from err
    return vllm


class WeightLoader:
    """A vLLM worker extension (vllm.LLM(worker_extension_cls=...)): its methods join every vLLM worker's, so
    VLLMEngine reaches them by name through LLM.collective_rpc (a name crosses vLLM's process boundary; a
    function would need VLLM_ALLOW_INSECURE_SERIALIZATION)."""

    model_runner: Any  # the vLLM worker's

    def r1pipe_load_weights(self, weights: list) -> int:
        """Load (Hugging Face name, tensor) pairs into this worker's model with the model's own loader; returns
        how many were given."""
        self.model_runner.model.load_weights(weights=[(str(name), t) for name, t in weights])
        return len(weights)


WEIGHT_LOADER = f"{WeightLoader.__module__}.{WeightLoader.__qualname__}"


class LogprobContractError(UserError, RuntimeError):
    """vLLM's log-probs are not the untruncated log_softmax(logits / T) r1pipe's trainer assumes."""


class VLLMEngine:
    """generate / iter_generate / update_weights / tokenizer like r1pipe.engine.LLM, on vllm.LLM.

    r1pipe's engine options carry over: dtype, max_num_seqs, speculative_k (vLLM's deepseek_mtp drafter),
    max_model_len, max_num_batched_tokens and block_size by name; num_blocks as num_gpu_blocks_override,
    cache_memory_gb as kv_cache_memory_bytes, cuda_graphs False as enforce_eager, fp8 as vLLM's online FP8
    quantization; ep_size must be 1 (vLLM's expert parallelism is its own enable_expert_parallel). Other
    keyword arguments go to vllm.LLM as they are. `device`: where the tensors this process exchanges with the
    engine live (the weight-sync buffers); vLLM itself runs on the device its build targets. check_logprobs:
    run `check_logprob_contract` once at start-up (raises LogprobContractError)."""

    def __init__(self, model: str | Path, tokenizer: Any = None, dtype: torch.dtype | str = "auto",
                 seed: int = 0, max_num_seqs: int = 256, speculative_k: int = 0, check_logprobs: bool = True,
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, block_size: int | None = None,
                 num_blocks: int | None = None, cache_memory_gb: float | None = None, cuda_graphs: bool | None = None,
                 fp8: bool = False, ep_size: int = 1, **vllm_kwargs: Any) -> None:
        if ep_size != 1:
            raise ConfigError(f"ep_size={ep_size}: r1pipe's ep_size spans r1pipe's own engine over several workers; "
                              "vLLM splits the experts inside one engine (enable_expert_parallel=True with "
                              "tensor_parallel_size / data_parallel_size, as vllm keyword arguments)")
        vllm = _import_vllm()
        if speculative_k:
            vllm_kwargs.setdefault("speculative_config", {"method": "deepseek_mtp",
                                                          "num_speculative_tokens": speculative_k})
        translated = {
            "max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens, "block_size": block_size,
            "num_gpu_blocks_override": num_blocks,
            "kv_cache_memory_bytes": None if cache_memory_gb is None else int(cache_memory_gb * 2**30),
            "enforce_eager": None if cuda_graphs is None else not cuda_graphs,
            "quantization": "fp8" if fp8 else None,
        }
        for key, value in translated.items():
            if value is not None:
                vllm_kwargs.setdefault(key, value)
        vllm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        vllm_kwargs.setdefault("worker_extension_cls", WEIGHT_LOADER)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._vllm = vllm
        self._request_ids = itertools.count()
        self._llm = vllm.LLM(model=str(model), tokenizer=None if tokenizer is None else str(tokenizer),
                             dtype=str(dtype).replace("torch.", ""), seed=seed, max_num_seqs=max_num_seqs, **vllm_kwargs)
        self.tokenizer = self._llm.get_tokenizer()
        if check_logprobs:
            self.check_logprob_contract()

    # ------------------------------------------------------------------ requests and results
    def _params(self, p: SamplingParams, top_logprobs: int = 0) -> Any:
        """vLLM's SamplingParams for `p`; log-probs (the sampled token's, plus the `top_logprobs` most likely)
        only for untruncated sampling, the only kind whose vLLM log-probs follow r1pipe's contract."""
        if p.return_routing:
            raise NotImplementedError("routing records need r1pipe's own engine (r1pipe.engine.LLM); "
                                      "rl.rollout.routing_replay needs rl.rollout.backend: engine")
        untruncated = p.top_k == -1 and p.top_p == 1.0
        return self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output, stop_token_ids=p.stop_token_ids,
            seed=p.seed, logprobs=top_logprobs if p.logprobs and untruncated else None, ignore_eos=p.ignore_eos,
            skip_special_tokens=p.skip_special_tokens)

    @staticmethod
    def _input(prompt: str | Sequence[int]) -> Any:
        return prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}

    @staticmethod
    def _output(request_id: int, r: Any) -> RequestOutput:
        """r1pipe's RequestOutput of vLLM's: each completion's log-probs are its sampled tokens' (None when
        vLLM returned none)."""
        comps = []
        for c in r.outputs:
            lps = None if c.logprobs is None else [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
            comps.append(CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids), logprobs=lps,
                                          finish_reason=c.finish_reason or "length", stop_reason=c.stop_reason))
        return RequestOutput(request_id=request_id, prompt=r.prompt, prompt_token_ids=list(r.prompt_token_ids),
                             outputs=comps)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; results in prompt order (as r1pipe.engine.LLM.generate)."""
        prompts, plist = pair_requests(prompts, params)
        results = self._llm.generate([self._input(p) for p in prompts], [self._params(p) for p in plist],
                                     use_tqdm=use_tqdm)
        return [self._output(i, r) for i, r in enumerate(results)]

    def iter_generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None
                      ) -> Iterator[list[tuple[int, RequestOutput]]]:
        """After each vLLM engine step that finished prompts, [(prompt index, output)] for them, while the others
        keep decoding (as r1pipe.engine.LLM.iter_generate), through vLLM's LLMEngine add_request / step loop.
        Closing the iterator early aborts the requests still in flight."""
        prompts, plist = pair_requests(prompts, params)
        engine = self._llm.llm_engine
        pending: dict[str, int] = {}  # vLLM request id -> prompt index
        try:
            for i, (prompt, p) in enumerate(zip(prompts, plist)):
                sp = self._params(p)
                sp.output_kind = self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY  # all n completions at once
                request_id = f"r1pipe-{next(self._request_ids)}"
                engine.add_request(request_id, self._input(prompt), sp)
                pending[request_id] = i
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM finished without returning {len(pending)} of the requests")
                finished = [(pending.pop(r.request_id), r) for r in engine.step()
                            if r.finished and r.request_id in pending]
                if finished:
                    yield sorted(((i, self._output(i, r)) for i, r in finished), key=lambda pair: pair[0])
        finally:
            if pending:
                engine.abort_request(list(pending))

    # ------------------------------------------------------------------ the log-prob contract
    def _first_position_logprobs(self, prompt: list[int], temperature: float, k: int) -> dict[int, float]:
        sp = self._params(SamplingParams(temperature=temperature, max_tokens=1, seed=0), top_logprobs=k)
        step = self._llm.generate([self._input(prompt)], [sp], use_tqdm=False)[0].outputs[0].logprobs[0]
        return {int(t): float(lp.logprob) for t, lp in step.items()}

    def check_logprob_contract(self, prompt: list[int] | None = None, temperature: float = 2.0, k: int = 8,
                               tol: float = 1e-2) -> None:
        """Verify on one probe that log-probs are the untruncated log_softmax(logits / T) (see the module
        docstring); raises LogprobContractError naming what differs. prompt: token ids (default: the
        tokenizer's encoding of a short text)."""
        if prompt is None:
            prompt = list(self.tokenizer.encode("1 + 1 ="))
        base = self._first_position_logprobs(prompt, 1.0, k)
        hot = self._first_position_logprobs(prompt, temperature, k)
        where = (f"vLLM log-probs (logprobs_mode={self._llm_logprobs_mode()!r}) are not the untruncated "
                 f"log_softmax(logits / T) r1pipe's trainer assumes")
        masked = sorted(t for t, lp in hot.items() if not math.isfinite(lp))
        if masked:
            raise LogprobContractError(f"{where}: with no top-k / top-p, tokens {masked[:5]} got -inf (a truncation mask)")
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
            raise LogprobContractError(f"{where}: the top log-probs at T={temperature} hold probability {mass:.4f}: "
                                       f"renormalised over a kept set of tokens")

    def _llm_logprobs_mode(self) -> Any:
        config = getattr(getattr(self._llm, "llm_engine", None), "model_config", None)
        return getattr(config, "logprobs_mode", "unknown")

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (Hugging Face names) on every vLLM worker with the model's own loader, then drop
        vLLM's prefix cache (computed with the old weights); returns how many were sent. The tensors travel as
        CPU tensors (vLLM's RPC carries only those) and are copied by the time this returns."""
        pairs = weights.items() if isinstance(weights, dict) else weights
        items = [(name, t.detach().cpu()) for name, t in pairs]
        self._llm.collective_rpc("r1pipe_load_weights", args=(items,))
        self._llm.reset_prefix_cache()
        return len(items)
