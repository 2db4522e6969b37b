"""The optional vLLM wrapper against the fake `vllm` package (tests/fake_vllm; vllm itself is not installable on
CPU CI).

What this covers: r1pipe.engine.vllm_backend's translation of options, SamplingParams and results (generate and
the streamed iter_generate), its start-up log-prob contract check (accepts log_softmax(logits / T), rejects raw
log-probs and truncated ones), weight loading through collective_rpc, the message when vllm is missing, and
eval's use of it. It does not exercise vllm: the fake stands in for vllm.LLM / vllm.SamplingParams.
"""
from __future__ import annotations

import sys

import pytest
import torch

from r1pipe.engine import SamplingParams


def reference_logprobs(llm, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each token, from the fake's logits of the sequence so far."""
    ids, out = list(prompt), []
    for tok in tokens:
        out.append(float(torch.log_softmax(llm._llm.logits(ids) / temperature, -1)[tok]))
        ids.append(tok)
    return out


def test_contract_holds_and_results_translate(fake_vllm):
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt", seed=3, speculative_k=2)
    assert llm._llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm._llm.kwargs["speculative_config"] == {"method": "deepseek_mtp", "num_speculative_tokens": 2}
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0.5, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    assert out.prompt_token_ids == [3, 4, 5] and len(c.token_ids) == 3 and c.finish_reason == "length"
    assert c.logprobs == pytest.approx(reference_logprobs(llm, [3, 4, 5], c.token_ids, 0.5), abs=1e-6)
    with pytest.raises(NotImplementedError, match="routing"):
        llm.generate([[1]], SamplingParams(return_routing=True), use_tqdm=False)


def test_engine_options_become_vllm_arguments(fake_vllm):
    """r1pipe's engine options (a recipe's `engine:` section) reach vllm.LLM under vLLM's names; `device` stays
    here (the weight-sync side); a misspelt vLLM argument fails in vLLM's EngineArgs."""
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt", dtype=torch.bfloat16, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=128,
                     block_size=32, num_blocks=10, cache_memory_gb=0.5, cuda_graphs=False, fp8=True, device="cpu",
                     check_logprobs=False)
    assert llm._llm.kwargs == {
        "dtype": "bfloat16", "seed": 0, "max_num_seqs": 4, "max_model_len": 64, "max_num_batched_tokens": 128,
        "block_size": 32, "num_gpu_blocks_override": 10, "kv_cache_memory_bytes": 2**29, "enforce_eager": True,
        "quantization": "fp8", "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "r1pipe.engine.vllm_backend.WeightLoader"}
    assert llm.device == torch.device("cpu")
    assert "enforce_eager" not in VLLMEngine("/ckpt", check_logprobs=False)._llm.kwargs  # cuda_graphs unset: vLLM's default
    with pytest.raises(TypeError, match="gpu_blocks"):
        VLLMEngine("/ckpt", gpu_blocks=3)


@pytest.mark.parametrize("mode,message", [("raw", "temperature is not applied"), ("truncated", "-inf")])
def test_startup_check_rejects_other_logprobs(fake_vllm, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_VLLM_LOGPROBS", mode)
    from r1pipe.engine.vllm_backend import LogprobContractError, VLLMEngine

    with pytest.raises(LogprobContractError, match=message):
        VLLMEngine("/ckpt")
    VLLMEngine("/ckpt", check_logprobs=False)  # the check can be skipped explicitly


def test_the_probe_samples_untruncated(fake_vllm):
    """The contract probe asks for untruncated sampling (vLLM's processed log-probs include a top-k / top-p
    mask), and truncated sampling gets no log-probs: vLLM's would be renormalised over the kept tokens."""
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt")
    probes = [e["params"] for e in fake_vllm.RECORD if e["event"] == "add_request"]
    assert [(p["temperature"], p["top_k"], p["top_p"], p["logprobs"]) for p in probes] == [(1.0, -1, 1.0, 8), (2.0, -1, 1.0, 8)]
    out = llm.generate([[3, 4], [5]], [SamplingParams(top_p=0.9), SamplingParams(top_k=5)], use_tqdm=False)
    assert all(c.logprobs is None for r in out for c in r.outputs)
    assert [e["params"]["logprobs"] for e in fake_vllm.RECORD if e["event"] == "add_request"][-2:] == [None, None]


def test_iter_generate_streams_what_generate_returns(fake_vllm):
    """Prompts come back as they finish (the shorter first), each exactly once with generate's completions;
    closing the stream early aborts what is still in flight."""
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt", check_logprobs=False)
    prompts = [[3, 4], [5], [6, 7, 8]]
    params = [SamplingParams(n=2, max_tokens=m, seed=i, ignore_eos=True) for i, m in enumerate([5, 2, 3])]
    steps = list(llm.iter_generate(prompts, params))
    assert [[i for i, _ in step] for step in steps] == [[1], [2], [0]]
    streamed = {i: out for step in steps for i, out in step}
    for i, out in enumerate(llm.generate(prompts, params, use_tqdm=False)):
        assert [(c.token_ids, c.logprobs, c.text) for c in streamed[i].outputs] == \
               [(c.token_ids, c.logprobs, c.text) for c in out.outputs]
    stream = llm.iter_generate(prompts, params)
    next(stream)
    stream.close()
    aborted = [e for e in fake_vllm.RECORD if e["event"] == "abort_request"]
    assert len(aborted) == 1 and len(aborted[0]["request_ids"]) == 2


def test_update_weights_reach_the_models_loader(fake_vllm):
    """Weights go by name through collective_rpc to the worker extension's loader (as CPU tensors, copied), then
    the prefix cache is dropped; a name the model lacks fails there."""
    from r1pipe.engine.vllm_backend import VLLMEngine

    llm = VLLMEngine("/ckpt", check_logprobs=False)
    w = {"model.a.weight": torch.arange(6.0).view(2, 3), "lm_head.weight": torch.ones(4)}
    assert llm.update_weights(w) == 2
    loaded = [e for e in fake_vllm.RECORD if e["event"] == "load_weights"]
    assert [[n, s] for n, s, _, _ in loaded[0]["weights"]] == [["model.a.weight", [2, 3]], ["lm_head.weight", [4]]]
    assert [e["event"] for e in fake_vllm.RECORD][-3:] == ["collective_rpc", "load_weights", "reset_prefix_cache"]
    model = llm._llm.worker.model_runner.model
    w["model.a.weight"].zero_()  # the engine holds its own copy
    assert torch.equal(model.weights["model.a.weight"], torch.arange(6.0).view(2, 3))


def test_missing_vllm_is_a_clear_import_error(monkeypatch):
    from r1pipe.engine.vllm_backend import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as where it is not installed
    with pytest.raises(ImportError, match=r"pip install 'r1pipe\[vllm\]'"):
        VLLMEngine("/ckpt")


def test_every_generation_path_opens_the_same_wrapper(fake_vllm):
    """GRPO, rejection sampling and `r1pipe eval --backend vllm` all build RolloutWorker(backend="vllm"), which
    opens VLLMEngine through open_engine and asks vLLM to keep the stop string (the rewards read `</answer>`)."""
    from r1pipe.engine.backend import open_engine
    from r1pipe.engine.vllm_backend import VLLMEngine
    from r1pipe.workers import RolloutWorker

    assert isinstance(open_engine("vllm", "/ckpt", seed=2), VLLMEngine)
    with pytest.raises(ValueError, match="'hf'.*engine, vllm"):
        open_engine("hf", "/ckpt")
    worker = RolloutWorker("/ckpt", {"max_num_seqs": 8}, seed=1, backend="vllm")
    assert isinstance(worker.llm, VLLMEngine) and worker.llm._llm.kwargs["max_num_seqs"] == 8
    worker.generate([[3, 4], [5, 6]], 1, 0.0, 4, seeds=[0, 1], stop=["</answer>"])
    asked = [e["params"] for e in fake_vllm.RECORD if "params" in e][-2:]  # after the start-up contract probes
    assert all(p["temperature"] == 0.0 and p["include_stop_str_in_output"] and p["stop"] == ["</answer>"] for p in asked), asked
