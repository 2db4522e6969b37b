"""The optional vLLM wrapper against a fake `vllm` module (vllm itself is not installable on CPU CI).

What this covers: r1pipe.engine.vllm_backend's translation of SamplingParams and results, its start-up
log-prob contract check (accepts log_softmax(logits / T), rejects raw log-probs and truncated ones), and
the rollout worker's use of it. It does not exercise vllm: the fake stands in for vllm.LLM / vllm.SamplingParams.
"""
from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

V = 12


def fake_logits(prompt: list[int]) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(sum(prompt))) * 2


@dataclasses.dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list | None = None
    include_stop_str_in_output: bool = False
    stop_token_ids: list | None = None
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1 + ord(ch) % (V - 1) for ch in text]


def fake_vllm(mode: str) -> types.ModuleType:
    """A vllm stand-in whose log-probs follow `mode`: "contract" = log_softmax(logits / T) (what
    logprobs_mode="processed_logprobs" promises), "raw" = log_softmax(logits), "truncated" = after the
    top-k mask (log-probs of the kept set only)."""

    class LLM:
        def __init__(self, model, tokenizer=None, dtype="auto", seed=0, max_num_seqs=256, **kwargs):
            self.kwargs = dict(kwargs, dtype=dtype, seed=seed, max_num_seqs=max_num_seqs)

        def get_tokenizer(self):
            return FakeTokenizer()

        def generate(self, inputs, params, use_tqdm=True):
            results = []
            for inp, p in zip(inputs, params):
                prompt = inp["prompt_token_ids"] if isinstance(inp, dict) else FakeTokenizer().encode(inp)
                ids, lps = [], []
                for _ in range(p.max_tokens):
                    z = fake_logits(prompt + ids)
                    t = p.temperature or 1.0
                    scaled = z if mode == "raw" else z / t
                    if mode == "truncated" and p.top_k > 0:
                        scaled = scaled.masked_fill(scaled < scaled.topk(p.top_k).values[-1], float("-inf"))
                    lp = torch.log_softmax(scaled, -1)
                    tok = int(z.argmax())
                    top = lp.topk(p.logprobs or 1).indices.tolist() if p.logprobs is not None else []
                    lps.append({i: types.SimpleNamespace(logprob=float(lp[i])) for i in top + [tok]})
                    ids.append(tok)
                comp = types.SimpleNamespace(index=0, text="".join(chr(65 + i) for i in ids), token_ids=ids,
                                             logprobs=lps if p.logprobs is not None else None,
                                             finish_reason="length", stop_reason=None)
                results.append(types.SimpleNamespace(prompt=None if isinstance(inp, dict) else inp,
                                                     prompt_token_ids=prompt, outputs=[comp]))
            return results

    return types.SimpleNamespace(LLM=LLM, SamplingParams=FakeSamplingParams)


@pytest.fixture
def install(monkeypatch):
    def put(mode: str):
        monkeypatch.setitem(sys.modules, "vllm", fake_vllm(mode))
    return put


def test_contract_holds_and_results_translate(install):
    install("contract")
    from r1pipe.engine import SamplingParams
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt", seed=3, speculative_k=2)
    assert llm._llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm._llm.kwargs["speculative_config"] == {"method": "deepseek_mtp", "num_speculative_tokens": 2}
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0.5, max_tokens=3), use_tqdm=False)[0].outputs[0]
    ids = [3, 4, 5]
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp == pytest.approx(float(torch.log_softmax(fake_logits(ids) / 0.5, -1)[tok]), abs=1e-6)
        ids.append(tok)
    with pytest.raises(NotImplementedError, match="routing"):
        llm.generate([[1]], SamplingParams(return_routing=True), use_tqdm=False)


@pytest.mark.parametrize("mode,message", [("raw", "temperature is not applied"), ("truncated", "-inf")])
def test_startup_check_rejects_other_logprobs(install, mode, message):
    install(mode)
    from r1pipe.engine.vllm_backend import LogprobContractError, VLLMEngine

    with pytest.raises(LogprobContractError, match=message):
        VLLMEngine("/ckpt")
    VLLMEngine("/ckpt", check_logprobs=False)  # the check can be skipped explicitly


def test_rollout_workers_use_the_same_wrapper(install, tmp_path):
    """A RolloutWorker with backend "vllm" (what a GenerationGroup, and so `r1pipe eval --backend vllm`, runs)
    holds a VLLMEngine built with the options given, and asks it to keep the stop string in the text."""
    install("contract")
    from r1pipe.engine.backend import open_engine
    from r1pipe.engine.vllm_backend import VLLMEngine
    from r1pipe.workers import RolloutWorker

    assert isinstance(open_engine("vllm", tmp_path, seed=2), VLLMEngine)
    with pytest.raises(ValueError, match="backend='hf'"):
        open_engine("hf", tmp_path)
    worker = RolloutWorker(str(tmp_path), {"max_num_seqs": 8}, seed=1, backend="vllm")
    assert isinstance(worker.llm, VLLMEngine) and worker.llm._llm.kwargs["max_num_seqs"] == 8
    asked = []
    generate = worker.llm._llm.generate
    worker.llm._llm.generate = lambda inputs, params, use_tqdm=True: asked.extend(params) or generate(inputs, params, use_tqdm)
    groups = worker.generate(["ab", "cd"], 1, 0.0, 4, seeds=[0, 1], stop=["</answer>"])
    assert [len(g[0].token_ids) for g in groups] == [4, 4] and [len(g[0].text) for g in groups] == [4, 4]
    assert all(p.include_stop_str_in_output and p.stop == ["</answer>"] for p in asked) and len(asked) == 2
