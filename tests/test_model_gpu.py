"""Grouped-GEMM MoE, bf16 autocast and FP8Linear on a CUDA GPU (run with `pytest -o addopts= -m gpu`)."""
import dataclasses

import pytest
import torch

from r1pipe.model import ModelConfig, Precision, Transformer, apply_precision, lm_loss
from r1pipe.model.experts import (GroupedExperts, fp8_grouped_linear, fp8_segment_linear, grouped_linear,
                                  padded_grouped_linear)
from r1pipe.model.fp8 import FP8Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def test_grouped_mm_bf16_matches_segments():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([37, 0, 128, 5, 0, 300, 1, 41])
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), 256, generator=g).cuda().bfloat16().requires_grad_()
    w = torch.randn(8, 512, 256, generator=g).cuda().bfloat16().requires_grad_()
    y = grouped_linear(x, w, offsets)
    bounds = [0] + offsets.tolist()
    xf, wf = x.detach().float(), w.detach().float()
    ref = torch.cat([xf[a:b] @ wf[e].t() for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    assert _rel(y.float(), ref) < 1e-2
    assert _rel(padded_grouped_linear(xf, wf, offsets), ref) < 1e-5  # the fp32 path on CUDA
    y.float().sum().backward()
    assert w.grad[1].abs().max() == 0 and x.grad.shape == x.shape


def test_model_bf16_cuda_trains_and_stays_close_to_fp32():
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_nextn_predict_layers=0)
    model = Transformer(config, seed=0).cuda()
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        fp32 = model(ids).logits
    apply_precision(model, Precision(dtype=torch.bfloat16))
    with torch.no_grad():
        bf16 = model(ids).logits
    assert _rel(bf16, fp32) < 0.1  # routing may flip on random weights
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, _ = lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_fp8_linear_under_autocast_on_cuda():
    torch.manual_seed(0)
    layer = FP8Linear(512, 384).cuda()
    ref = torch.nn.Linear(512, 384, bias=False).cuda()
    ref.weight.data.copy_(layer.weight.data)
    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(dy)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(dy)
    assert _rel(y.float(), ref(xr).detach()) < 0.05
    assert _rel(layer.weight.grad, ref.weight.grad) < 0.05 and _rel(x.grad, xr.grad) < 0.05
    assert layer.weight.grad.dtype == torch.float32


def test_fp32_and_fp8_experts_on_cuda_capture_in_a_cuda_graph():
    """fp32 and FP8 experts on CUDA take the grouped paths with no host read: a CUDA graph captures them, and
    its replay on new routing equals the eager result (FP8: equals the per-segment FP8Linear GEMMs)."""
    torch.manual_seed(0)
    for fp8 in (False, True):
        experts = GroupedExperts(8, 256, 128, fp8=fp8).cuda()
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0, 0.05)
        if fp8:
            experts.quantize_weight_()
        xs = torch.randn(64, 256, device="cuda")
        offsets = torch.tensor([8] * 8, device="cuda").cumsum(0).to(torch.int32)
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                experts(xs, offsets)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = experts(xs, offsets)
            xs.copy_(torch.randn(64, 256, device="cuda"))
            offsets.copy_(torch.tensor([0, 30, 1, 0, 17, 0, 16, 0], device="cuda").cumsum(0).to(torch.int32))
            graph.replay()
            eager = experts(xs, offsets)
            assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
            if fp8:
                w, s = experts.gate_proj, experts.gate_proj_scale_inv
                ref = fp8_segment_linear(xs, w, s, offsets).float()
                assert _rel(fp8_grouped_linear(xs, w, s, offsets).float(), ref) < 1e-5
