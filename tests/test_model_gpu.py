"""Grouped-GEMM MoE, bf16 autocast and FP8Linear on a CUDA GPU (run with `pytest -o addopts= -m gpu`)."""
import dataclasses

import pytest
import torch

from r1pipe.model import ModelConfig, Precision, Transformer, apply_precision, lm_loss
from r1pipe.model.experts import grouped_linear, segment_linear
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
    ref = segment_linear(x.detach().float(), w.detach().float(), offsets)
    assert _rel(y.float(), ref) < 1e-2
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
