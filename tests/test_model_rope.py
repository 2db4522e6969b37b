"""RoPE by hand: interleaved pairs rotated as complex numbers (fp32) give exactly the pairwise formula
x'_2i = x_2i cos - x_2i+1 sin, x'_2i+1 = x_2i+1 cos + x_2i sin, values and gradients, at any offset."""
import math

import pytest
import torch

from r1pipe.model.rope import apply_rope


def pairwise(x, cos, sin):
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def test_a_quarter_turn_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos = torch.tensor([[[0.0, 1.0]]])  # first pair turned by 90 degrees, second not at all
    sin = torch.tensor([[[1.0, 0.0]]])
    assert apply_rope(x, cos, sin, interleave=True).flatten().tolist() == [-2.0, 1.0, 3.0, 4.0]
    c, s = math.cos(0.5), math.sin(0.5)
    got = apply_rope(x, torch.tensor([[[c, c]]]), torch.tensor([[[s, s]]]), interleave=True).flatten()
    torch.testing.assert_close(got, torch.tensor([c - 2 * s, 2 * c + s, 3 * c - 4 * s, 4 * c + 3 * s]))


@pytest.mark.parametrize("offset", [0, 1, 5, 32])  # a slice of a wider row, as q_rope / k_rope are
@pytest.mark.parametrize("heads", [4, 1])
def test_complex_rotation_equals_the_pairwise_formula(offset, heads):
    g = torch.Generator().manual_seed(offset + heads)
    wide = torch.randn(2, 5, heads, offset + 16 + 3, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    grad = torch.randn(2, 5, heads, 16, generator=g)
    x = wide[..., offset:offset + 16]
    got = apply_rope(x, cos, sin, interleave=True)
    (got_grad,) = torch.autograd.grad(got, wide, grad)
    ref = pairwise(x, cos, sin)
    (ref_grad,) = torch.autograd.grad(ref, wide, grad)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_bfloat16_keeps_the_real_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 16, generator=g).bfloat16()
    cos, sin = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    assert torch.equal(apply_rope(x, cos, sin, interleave=True), pairwise(x, cos.bfloat16(), sin.bfloat16()))
