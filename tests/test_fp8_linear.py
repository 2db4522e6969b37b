"""FP8Linear against the fp32 linear: forward, gradients, ragged shapes, FP8-weight inference mode."""
import pytest
import torch
from torch import nn

from r1pipe.model.fp8 import FP8Linear, fp8_linear
from r1pipe.model.fp8 import quant as Q

# Each GEMM quantizes both operands to E4M3 (~2.5% RMS each), so outputs and gradients of random
# data land near sqrt(2) x 2.5% ~ 3.6% relative (Frobenius) error; 5% is the stated bound.
BOUND = 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(in_features: int, out_features: int, bias: bool, seed: int) -> tuple[FP8Linear, nn.Linear]:
    torch.manual_seed(seed)
    fp8 = FP8Linear(in_features, out_features, bias=bias)
    ref = nn.Linear(in_features, out_features, bias=bias)
    ref.load_state_dict(fp8.state_dict())
    return fp8, ref


@pytest.mark.parametrize("shape,in_f,out_f", [((4, 64, 256), 256, 384), ((3, 7, 200), 200, 300), ((130,), 130, 1)])
def test_forward_and_gradients_close_to_fp32(shape, in_f, out_f):
    fp8, ref = _pair(in_f, out_f, bias=True, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape[:-1], in_f, generator=g) if len(shape) > 1 else torch.randn(1, in_f, generator=g)
    x8, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y8, yr = fp8(x8), ref(xr)
    assert y8.shape == yr.shape and y8.dtype == torch.float32
    assert _rel(y8, yr) < BOUND
    grad = torch.randn(yr.shape, generator=g)
    y8.backward(grad)
    yr.backward(grad)
    assert _rel(x8.grad, xr.grad) < BOUND
    assert _rel(fp8.weight.grad, ref.weight.grad) < BOUND
    assert torch.allclose(fp8.bias.grad, ref.bias.grad)
    assert fp8.weight.grad.dtype == torch.float32  # master gradients stay fp32


def test_fp8_error_is_real_not_a_passthrough():
    """The forward must actually quantize: it differs from fp32 by the E4M3 error, not by zero."""
    fp8, ref = _pair(256, 256, bias=False, seed=2)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    assert 0.01 < _rel(fp8(x), ref(x)) < BOUND


def test_bf16_activations():
    fp8, ref = _pair(256, 128, bias=False, seed=4)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_()
    y = fp8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and fp8.weight.grad.dtype == torch.float32
    assert _rel(y.float(), ref(x.detach().float())) < BOUND


def test_training_steps_reduce_loss_like_fp32():
    """Adam on a linear regression: FP8 follows the fp32 loss curve to within 2% of the starting loss."""
    g = torch.Generator().manual_seed(6)
    x, target_w = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g)
    y = x @ target_w.t()
    losses = {}
    for name, layer in zip(("fp8", "fp32"), _pair(128, 64, bias=False, seed=7)):
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for _ in range(40):
            loss = nn.functional.mse_loss(layer(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    start = nn.functional.mse_loss(x @ torch.zeros(128, 64), y).item()
    assert losses["fp32"] < 0.2 * start
    assert abs(losses["fp8"] - losses["fp32"]) < 0.02 * start


def test_fp8_weights_mode_state_dict_memory_and_grad():
    fp8, ref = _pair(300, 200, bias=False, seed=8)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(9))
    before = fp8(x)
    fp8.quantize_weight_()
    assert fp8.holds_fp8_weight and not fp8.weight.requires_grad
    state = fp8.state_dict()
    assert set(state) == {"weight", "weight_scale_inv"}
    assert state["weight"].dtype == Q.FP8_DTYPE and state["weight_scale_inv"].shape == (2, 3)
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert weight_bytes == 300 * 200 + 2 * 3 * 4
    assert torch.equal(fp8(x), before)  # the same blocks the training path computes on the fly
    assert _rel(fp8.dequantized_weight(), ref.weight.detach()) < 0.03
    xg = x.clone().requires_grad_()
    fp8(xg).sum().backward()  # dgrad through frozen FP8 weights
    assert _rel(xg.grad, ref.weight.detach().sum(0).expand_as(xg)) < BOUND


def test_load_fp8_weight_round_trip_and_errors():
    layer = FP8Linear(256, 128)
    q, s = Q.weight_quant_ref(torch.randn(128, 256, generator=torch.Generator().manual_seed(10)))
    fresh = FP8Linear(256, 128)
    fresh.load_fp8_weight(q, s)
    target = FP8Linear(256, 128)
    target.load_fp8_weight(torch.zeros_like(q), torch.ones_like(s))
    target.load_state_dict(fresh.state_dict())
    assert torch.equal(target.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(target.weight_scale_inv, s)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        layer.load_fp8_weight(q, s[:, :1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        layer.load_fp8_weight(q.float(), s)
    with pytest.raises(ValueError, match="weight_scale"):
        fp8_linear(torch.randn(2, 256), q)


def test_empty_batch():
    layer = FP8Linear(128, 64, bias=True)
    x = torch.zeros(0, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 128)


def test_module_to_dtype_keeps_fp8_weights():
    layer = FP8Linear(256, 128, bias=True)
    layer.quantize_weight_()
    q, s = layer.weight.detach().clone(), layer.weight_scale_inv.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == Q.FP8_DTYPE and layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.weight_scale_inv, s)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 256).bfloat16()).dtype == torch.bfloat16


def test_wgrad_uses_the_cached_fp8_input_as_the_v3_recipe():
    """Backward keeps only the FP8 copy of x: the weight gradient is exactly dy^T @ x re-tiled from that copy
    (dequantize, transpose, quantize along tokens), and no 32-bit activation is saved for it."""
    from r1pipe.model.fp8 import act_quant, fp8_gemm
    from r1pipe.model.fp8.quant import act_dequant_ref

    fp8, ref = _pair(256, 384, bias=False, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 256, generator=g) * torch.logspace(-2, 2, 256)  # channels of very different scale
    dy = torch.randn(200, 384, generator=g)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    y.backward(dy)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)  # x itself is not kept
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == x.shape for t in saved)

    qx, sx = act_quant(x)
    retiled = act_quant(act_dequant_ref(qx, sx).t().contiguous())
    expected = fp8_gemm(*act_quant(dy.t().contiguous()), *retiled, torch.float32, b_scale_rows=1)
    assert torch.equal(fp8.weight.grad, expected)
    ref(x).backward(dy)
    assert _rel(fp8.weight.grad, ref.weight.grad) < BOUND  # double rounding stays inside the FP8 error


def test_act_dequant_inverts_act_quant_within_e4m3():
    from r1pipe.model.fp8 import act_quant
    from r1pipe.model.fp8.quant import act_dequant_ref

    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(5))
    q, s = act_quant(x)
    back = act_dequant_ref(q, s)
    assert back.shape == x.shape and _rel(back, x) < 0.03
    assert torch.equal(act_quant(back)[0], q)  # representable values quantize to themselves


def test_autocast_bf16_gives_bf16_output_and_fp32_master_grad():
    fp8, ref = _pair(256, 128, bias=False, seed=6)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(7), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fp8.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert _rel(y.float(), ref(x).detach()) < BOUND
