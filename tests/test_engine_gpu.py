"""The engine on a CUDA GPU (run with `pytest -m gpu`): the Triton paged MLA kernel in bf16/fp32 against the
torch path, greedy generation on the GPU against the fp32 CPU engine, CUDA-graph decode against uncaptured
decode, and the FP8 engine on the GPU against the torch reference FP8 model."""
import copy
import dataclasses

import pytest
import torch
from fp8_reference import PROMPTS, cached_decode, fp8_test_model

from r1pipe.engine import LLM, SamplingParams
from r1pipe.engine.paged_cache import PagedCache
from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.precision import hold_fp8_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("S", [1, 3])
def test_paged_kernel_matches_torch_path(dtype, tol, S):
    g = torch.Generator().manual_seed(0)
    B, H, C, R, bs, blocks = 5, 16, 512, 64, 16, 64
    tables = [torch.randperm(blocks - 1, generator=g)[:n].add(1).tolist() for n in (1, 3, 8, 2, 5)]
    lengths = torch.tensor([9, 40, 127, 17, 80])
    positions = (lengths - S).clamp(min=0).unsqueeze(1) + torch.arange(S)
    valid = torch.ones(B, S, dtype=torch.bool)
    ql, qr = torch.randn(B, S, H, C, generator=g), torch.randn(B, S, H, R, generator=g)
    lat, kr = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    kv0, pe0 = torch.randn(1, blocks * bs, C, generator=g), torch.randn(1, blocks * bs, R, generator=g)
    outs = {}
    for backend in ("torch", "triton"):
        cache = PagedCache(1, blocks, bs, (C, R), dtype=dtype, device="cuda", attention_backend=backend)
        cache.pools[0][:, 0].copy_(kv0)
        cache.pools[1][:, 0].copy_(pe0)
        cache.plan(tables, positions, valid)
        outs[backend] = cache.attend(0, ql.to("cuda", dtype), qr.to("cuda", dtype), lat.to("cuda", dtype),
                                     kr.to("cuda", dtype), 0.1).float().cpu()
    err = (outs["triton"] - outs["torch"]).abs().max() / outs["torch"].abs().max()
    assert err < tol


def test_auto_backend_is_triton_on_cuda():
    pytest.importorskip("triton")
    assert PagedCache(1, 4, 16, (64, 16), device="cuda").attention_backend == "triton"


def test_greedy_on_gpu_equals_cpu_fp32():
    model = Transformer(dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3), seed=7).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [42]]
    sp = SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True)
    cpu = LLM(model, block_size=4, num_blocks=128).generate(prompts, sp, use_tqdm=False)
    gpu = LLM(model.to("cuda"), device="cuda", block_size=4, num_blocks=128).generate(prompts, sp, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in gpu] == [[c.token_ids for c in o.outputs] for o in cpu]


def test_cuda_graph_decode_equals_uncaptured():
    """engine.cuda_graphs (on by default on CUDA): decode steps replayed from per-bucket graphs give the greedy
    tokens of the uncaptured engine, and log-probs to fp32 rounding, while the batch shrinks through several
    buckets (completions of different lengths) and after an in-place weight update."""
    model = Transformer(dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3), seed=7).eval().cuda()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [42], [7, 7, 7, 7]]
    params = [SamplingParams(n=3, temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 9, 4, 14)]
    eager = LLM(model, device="cuda", block_size=4, num_blocks=256, cuda_graphs=False)
    graphed = LLM(model, device="cuda", block_size=4, num_blocks=256)
    assert graphed.cuda_graphs and graphed.runner.graphs is not None
    for update in (False, True):
        if update:  # new weights in place: the captured graphs must read them
            new = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
            eager.update_weights(new)
            graphed.update_weights(new)
        a = eager.generate(prompts, params, use_tqdm=False)
        b = graphed.generate(prompts, params, use_tqdm=False)
        for x, y in zip(a, b):
            for cx, cy in zip(x.outputs, y.outputs):
                assert cx.token_ids == cy.token_ids
                assert max(abs(p - q) for p, q in zip(cx.logprobs, cy.logprobs)) < 1e-4
    assert graphed.runner.graphs.captures >= 3  # 12 rows -> buckets 16, 8, 4 ... as completions end


def test_fp8_engine_on_gpu_matches_cpu_reference():
    """The FP8 engine on CUDA (block-scaled GEMMs on cuBLAS/Triton, grouped FP8 experts, CUDA graphs) against the
    torch reference FP8 model on the CPU: the same greedy tokens, log-probs to 1e-3 (fp32 summation order)."""
    model = fp8_test_model()
    reference = copy.deepcopy(model)
    hold_fp8_weights(reference)
    llm = LLM(copy.deepcopy(model).cuda(), device="cuda", num_blocks=64, block_size=4, fp8=True)
    assert llm.cuda_graphs
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logps = cached_decode(reference, prompt, 12)
        assert out.outputs[0].token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.outputs[0].logprobs, logps)) < 1e-3
