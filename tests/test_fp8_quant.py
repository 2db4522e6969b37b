"""The torch reference of the FP8 recipe: rounding, tile/block scales, ragged shapes, the block-scaled GEMM."""
import pytest
import torch

from r1pipe.model.fp8 import quant as Q
from r1pipe.model.fp8.gemm import act_quant, fp8_gemm, weight_quant


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _e4m3_grid() -> torch.Tensor:
    """All finite non-negative E4M3 values (bit patterns 0x00..0x7E), ascending."""
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(Q.FP8_DTYPE).float()


def test_round_to_e4m3_matches_torch_cast_including_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-14, 9, (200_000,), generator=g).float())
    x = x.clamp(-Q.FP8_MAX, Q.FP8_MAX)
    grid = _e4m3_grid()
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact ties: round-to-nearest-even decides
    for values in (x, midpoints, -midpoints, grid):
        assert torch.equal(Q.round_to_e4m3(values), values.to(Q.FP8_DTYPE).float())
    # hand-checked ties: 1.0625 sits between 1.0 (even) and 1.125; 1.1875 between 1.125 and 1.25 (even)
    assert Q.round_to_e4m3(torch.tensor([1.0625, 1.1875, 1.9375])).tolist() == [1.0, 1.25, 2.0]


def test_act_quant_hand_checked_tile():
    x = torch.zeros(1, 128)
    x[0, :4] = torch.tensor([896.0, -2.0, 1.0, 0.0])  # amax 896 -> scale 2
    q, s = Q.act_quant_ref(x)
    assert s.tolist() == [[2.0]]
    assert q.float()[0, :4].tolist() == [448.0, -1.0, 0.5, 0.0]


def test_act_quant_ragged_and_zero_tiles():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 300, generator=g)
    x[0, 0] = 0.0
    q, s = Q.act_quant_ref(x)
    assert q.shape == (3, 5, 300) and q.dtype == Q.FP8_DTYPE and s.shape == (3, 5, 3)
    assert torch.all(q[0, 0].float() == 0) and torch.isfinite(s).all() and (s > 0).all()
    # each tile's largest magnitude lands on (or next to) 448 and the ragged tile is scaled by its own 44 values
    assert torch.allclose(s[..., 2], x[..., 256:].abs().amax(-1) / 448)


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (1, 129)])
def test_weight_quant_dequant_error_within_e4m3(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g)
    q, s = Q.weight_quant_ref(w)
    assert s.shape == (Q.cdiv(shape[0], 128), Q.cdiv(shape[1], 128))
    err = _rel(Q.weight_dequant_ref(q, s), w)
    # E4M3 keeps 3 mantissa bits: RTN error per value <= 2^-4 relative, about 2.5% RMS on normal data
    assert 0.01 < err < 0.03


def test_act_quant_random_normal_error_within_e4m3():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 512, generator=g)
    q, s = Q.act_quant_ref(x)
    deq = q.float().view(64, 4, 128) * s[..., None]
    assert 0.01 < _rel(deq.view(64, 512), x) < 0.03


def test_power_of_two_scales():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 256, generator=g) * 7
    q, s = Q.act_quant_ref(x, power_of_two=True)
    mantissa = s.view(torch.int32) & 0x7FFFFF
    assert torch.all(mantissa == 0)
    amax = x.view(8, 2, 128).abs().amax(-1)
    assert torch.all(s >= amax / 448) and torch.all(s < 2 * amax / 448)
    assert Q.scale_from_amax(torch.tensor([448.0, 449.0, 3.5])).tolist()[:1] == [1.0]
    assert Q.scale_from_amax(torch.tensor([448.0, 449.0, 3.5]), True).tolist() == [1.0, 2.0, 2.0**-7]


def _representable(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Integers in [-16, 16] (all on the E4M3 grid) with each 1x128 tile and 128x128 block reaching 448,
    so every scale is exactly 1 and every partial sum is an integer below 2^24 (exact in fp32)."""
    x = torch.randint(-16, 17, (rows, cols), generator=g).float()
    x[:, ::128] = 448.0
    return x


def test_representable_inputs_are_exact():
    g = torch.Generator().manual_seed(5)
    a, b = _representable(16, 384, g), _representable(256, 384, g)
    qa, sa = Q.act_quant_ref(a)
    qb, sb = Q.weight_quant_ref(b)
    assert torch.all(sa == 1) and torch.all(sb == 1)
    assert torch.equal(qa.float(), a) and torch.equal(qb.float(), b)
    assert torch.equal(Q.fp8_gemm_ref(qa, sa, qb, sb).double(), a.double() @ b.double().t())


@pytest.mark.parametrize("m,n,k,rows", [(33, 300, 200, 128), (20, 70, 130, 1)])
def test_gemm_equals_dequantized_matmul(m, n, k, rows):
    """The block-scaled GEMM is the matmul of the dequantized operands (to fp32 rounding)."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    qa, sa = act_quant(a, backend="torch")
    qb, sb = act_quant(b, backend="torch") if rows == 1 else weight_quant(b, backend="torch")
    out = fp8_gemm(qa, sa, qb, sb, b_scale_rows=rows, backend="torch")
    deq_a = qa.double() * Q.expand_block_scales(sa, m, k, 1).double()
    deq_b = qb.double() * Q.expand_block_scales(sb, n, k, rows).double()
    assert out.shape == (m, n) and _rel(out, deq_a @ deq_b.t()) < 1e-6
    assert _rel(out, a @ b.t()) < 0.05  # both operands quantized: ~sqrt(2) x 2.5%


def test_bad_inputs_raise_clear_errors():
    qa = torch.zeros(4, 128, dtype=Q.FP8_DTYPE)
    with pytest.raises(ValueError, match="inner dimensions"):
        fp8_gemm(qa, torch.ones(4, 1), torch.zeros(8, 256, dtype=Q.FP8_DTYPE), torch.ones(1, 2), backend="torch")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm(torch.zeros(4, 128), torch.ones(4, 1), qa, torch.ones(1, 1))
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        act_quant(torch.zeros(2, 128), backend="cuda")
