"""The Triton FP8 kernels on a CUDA GPU against the torch reference (run with `pytest -m gpu`)."""
import pytest
import torch

from r1pipe.model.fp8 import FP8Linear
from r1pipe.model.fp8 import quant as Q
from r1pipe.model.fp8.gemm import act_quant, fp8_gemm, weight_dequant, weight_quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,k", [(1024, 2048), (37, 300)])
def test_quant_kernels_bit_exact(m, k, pow2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-10, 10, (m, 1), generator=g).float())
    qt, st = act_quant(x.cuda(), pow2)
    qr, sr = Q.act_quant_ref(x, pow2)
    assert _same_bits(qt, qr) and torch.equal(st.cpu(), sr)
    qt, st = weight_quant(x.cuda().bfloat16(), pow2)
    qr, sr = Q.weight_quant_ref(x.bfloat16(), pow2)
    assert _same_bits(qt, qr) and torch.equal(st.cpu(), sr)
    assert torch.equal(weight_dequant(qt, st, torch.float32).cpu(), Q.weight_dequant_ref(qr, sr))


def test_gemm_representable_exact():
    """Small integer operands (partial sums < 2^11) with scales exactly 1: every path is exact."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-1, 2, (256, 512), generator=g).float()
    b = torch.randint(-1, 2, (384, 512), generator=g).float()
    a[:, ::128], b[:, 1::128] = 448.0, 448.0  # markers never meet in one product
    qa, sa = act_quant(a.cuda())
    qb, sb = weight_quant(b.cuda())
    assert torch.equal(fp8_gemm(qa, sa, qb, sb, torch.float32).double().cpu(), a.double() @ b.double().t())


@pytest.mark.parametrize("m,n,k,rows", [(512, 1024, 2048, 128), (333, 1000, 300, 128), (512, 640, 4100, 1)])
def test_gemm_matches_reference(m, n, k, rows):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    qa, sa = Q.act_quant_ref(a)
    qb, sb = Q.act_quant_ref(b) if rows == 1 else Q.weight_quant_ref(b)
    ref = Q.fp8_gemm_ref(qa, sa, qb, sb, torch.float32, rows)
    out = fp8_gemm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), torch.float32, rows)
    # Hopper's FP8 tensor cores add within a 128-chunk with a shortened mantissa (the paper's ~14 bits);
    # measured ~1.2e-4 relative against the exact fp32 reference
    assert _rel(out, ref) < 1e-3
    out16 = fp8_gemm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), torch.bfloat16, rows)
    assert out16.dtype == torch.bfloat16 and _rel(out16, ref) < 8e-3


def test_fp8_linear_cuda_matches_cpu_path_and_fp32():
    torch.manual_seed(3)
    layer = FP8Linear(1000, 700, bias=True)
    x = torch.randn(4, 96, 1000)
    ref = torch.nn.Linear(1000, 700, bias=True)
    ref.load_state_dict(layer.state_dict())
    grads = {}
    for device in ("cpu", "cuda"):
        layer.zero_grad()
        xd = x.detach().to(device).requires_grad_()
        y = layer.to(device)(xd)
        y.backward(torch.ones_like(y))
        grads[device] = (y.detach().cpu(), xd.grad.cpu(), layer.weight.grad.cpu())
    for cpu_t, cuda_t in zip(grads["cpu"], grads["cuda"]):
        assert _rel(cuda_t, cpu_t) < 1e-3
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(torch.ones_like(yr))
    assert _rel(grads["cuda"][0], yr) < 0.05 and _rel(grads["cuda"][1], xr.grad) < 0.05
    assert _rel(grads["cuda"][2], ref.weight.grad) < 0.05


@pytest.mark.parametrize("rows", [128, 1])
def test_cublas_blockwise_matches_reference(rows):
    """torch._scaled_mm block-wise path (used by backend 'auto' where cuBLAS supports it)."""
    from r1pipe.model.fp8.gemm import cublas_blockwise_supported

    m, n, k = 256, 512, 1024
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    qa, sa = Q.act_quant_ref(a)
    qb, sb = Q.act_quant_ref(b) if rows == 1 else Q.weight_quant_ref(b)
    if not cublas_blockwise_supported(qa.cuda(), qb.cuda(), rows):
        pytest.skip("cuBLAS block-wise scaling unavailable for this layout")
    ref = Q.fp8_gemm_ref(qa, sa, qb, sb, torch.float32, rows)
    out = fp8_gemm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), torch.bfloat16, rows, backend="cublas")
    assert _rel(out, ref) < 8e-3
