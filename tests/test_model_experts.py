"""Stacked routed experts: grouped GEMM against per-expert matmuls, HF per-expert keys, no host sync."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from r1pipe.model import ModelConfig, Transformer
from r1pipe.model import experts as experts_module
from r1pipe.model.experts import (GroupedExperts, bucket_rows, fp8_segment_linear, grouped_linear, padded_grouped_linear,
                                  padded_segments, tile_layout)
from r1pipe.model.moe import MoE


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_matches_per_expert_matmuls_with_empty_experts(dtype):
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 0, 1, 7]  # empty experts in the middle and a single-row one
    x = torch.randn(sum(counts), 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), 24, 16, generator=g).to(dtype).requires_grad_()
    y = grouped_linear(x, w, _offsets(counts))
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([x2[a:b] @ w2[e].t() for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    tol = 0 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    ref.backward(dy)
    assert torch.allclose(x.grad.float(), x2.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(w.grad.float(), w2.grad.float(), atol=tol, rtol=tol)
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # an expert with no tokens gets no gradient
    padded_tol = max(tol, 1e-5)  # a batched matmul may sum in another order
    assert torch.allclose(padded_grouped_linear(x.detach(), w.detach(), _offsets(counts)).float(), ref.float(),
                          atol=padded_tol, rtol=padded_tol)


def test_bucket_rows_by_hand():
    n = torch.tensor([0, 1, 16, 17, 20, 21, 33, 100, 2500, 4096, 4097])
    assert bucket_rows(n).tolist() == [0, 16, 16, 20, 20, 24, 40, 112, 2560, 4096, 5120]
    lengths = bucket_rows(torch.arange(1, 20000))
    assert len(set(lengths.tolist())) <= 4 * 11  # 4 per doubling from 16 to 2^15
    assert bool((lengths >= torch.arange(1, 20000)).all()) and float((lengths / torch.arange(1, 20000)).max()) <= 16


def test_padded_segments_by_hand():
    where, offsets, total = padded_segments(_offsets([3, 0, 20]))
    assert where.tolist() == [0, 1, 2] + list(range(16, 36)) and offsets.tolist() == [16, 16, 36] and total == 36


def test_tile_layout_by_hand():
    where, tile_expert, n_tiles = tile_layout(_offsets([3, 0, 20, 1]), 24, tile=8)
    # expert 0: rows 0-2 at 0-2 (tile 0); expert 2: 20 rows at 8-27 (tiles 1-3); expert 3: 1 row at 32 (tile 4)
    assert where.tolist() == [0, 1, 2] + list(range(8, 28)) + [32]
    assert n_tiles == 3 + 4 and tile_expert.tolist() == [0, 2, 2, 2, 3, 3, 3]


def _forbid_host_reads(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the experts")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__int__", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)


def test_padded_grouped_linear_equals_per_expert_matmuls_without_host_reads(monkeypatch):
    """The fp32 path where torch._grouped_mm cannot run (CUDA fp32, torch.compile): outputs and gradients
    equal one matmul per expert segment, with empty experts and segments longer than a tile."""
    g = torch.Generator().manual_seed(1)
    counts = [0, 17, 1, 0, 40, 3]
    x = torch.randn(sum(counts), 24, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 20, 24, generator=g, requires_grad=True)
    dy = torch.randn(sum(counts), 20, generator=g)
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([x2[a:b] @ w2[e].t() for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    ref.backward(dy)
    offsets = _offsets(counts)
    _forbid_host_reads(monkeypatch)
    y = padded_grouped_linear(x, w, offsets)
    y.backward(dy)
    monkeypatch.undo()
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "fp8 compute", "fp8 weights"])
def test_experts_in_every_precision_never_read_counts_on_the_host(monkeypatch, precision):
    """fp32 experts where torch._grouped_mm is unusable (as on CUDA in fp32) and FP8 experts (master weights
    quantized on the fly, or held FP8 weights) at inference: no tolist/item/int/bool of a tensor, and the
    outputs of the reference paths (one matmul or one FP8Linear GEMM per expert segment)."""
    torch.manual_seed(0)
    experts = GroupedExperts(5, 256, 160, fp8=precision != "fp32")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)
    if precision == "fp8 weights":
        experts.quantize_weight_()
    counts = [6, 0, 21, 1, 12]
    offsets = _offsets(counts)
    xs, scale = torch.randn(sum(counts), 256), torch.rand(sum(counts))
    with torch.no_grad():
        if precision == "fp32":
            bounds = [0] + offsets.tolist()
            seg = lambda x, n: torch.cat([x[a:b] @ getattr(experts, n)[e].t()  # noqa: E731
                                          for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
        else:
            seg = lambda x, n: fp8_segment_linear(x, getattr(experts, n), getattr(experts, n + "_scale_inv"),  # noqa: E731
                                                  offsets)
        hidden = torch.nn.functional.silu(seg(xs, "gate_proj")) * seg(xs, "up_proj") * scale[:, None]
        ref = seg(hidden, "down_proj")
        monkeypatch.setattr(experts_module, "_grouped_mm_usable", lambda x, w: False)
        _forbid_host_reads(monkeypatch)
        got = experts(xs, offsets, scale)
    monkeypatch.undo()
    assert got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_bf16_experts_on_cpu_run_padded_segments_with_the_same_result():
    """bf16 on CPU pads each expert's rows to a bucketed length (oneDNN compiles per shape): outputs and
    gradients equal the fp32 per-expert reference to bf16 precision, and the matmuls only see bucketed
    lengths."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    counts = [5, 0, 37, 18]
    x = torch.randn(sum(counts), 32, requires_grad=True)
    dy = torch.randn(sum(counts), 32)
    seen: list[int] = []
    mm = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        seen.extend(torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist())
        return mm(a, b, offs=offs, **kw)

    torch._grouped_mm = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(x, _offsets(counts))
    finally:
        torch._grouped_mm = mm
    y.float().backward(dy)
    got = (y.float(), x.grad.clone(), [getattr(experts, n).grad.clone() for n in ("gate_proj", "up_proj", "down_proj")])
    x.grad = None
    experts.zero_grad()
    ref = experts(x, _offsets(counts))  # fp32, unpadded
    ref.backward(dy)
    assert set(seen) == {16, 0, 40, 20}

    def close(a, b):  # bf16 precision: ~1% relative error
        return float((a - b).norm() / b.norm()) < 2e-2

    assert close(got[0], ref) and close(got[1], x.grad)
    for g, name in zip(got[2], ("gate_proj", "up_proj", "down_proj")):
        assert close(g, getattr(experts, name).grad), name
    assert torch.equal(got[2][0][1], torch.zeros(16, 32))  # the empty expert gets no gradient


def _moe_config(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=32, moe_intermediate_size=16,
                               n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, **overrides)


def test_moe_matches_a_loop_over_experts():
    """The grouped path against a transparent per-token reference: sum_k w_k * expert_{e_k}(x) + shared(x)."""
    torch.manual_seed(0)
    moe = MoE(_moe_config(), "model.layers.1.mlp")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, 32)
    out, ids, _ = moe(x)
    flat = x.reshape(-1, 32)
    weights, indices, _ = moe.gate(flat)
    ex = moe.experts
    ref = moe.shared_experts(flat).clone()
    for t in range(flat.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            h = F.silu(flat[t] @ ex.gate_proj[e].t()) * (flat[t] @ ex.up_proj[e].t())
            ref[t] += weights[t, k] * (h @ ex.down_proj[e].t())
    assert torch.allclose(out.reshape(-1, 32), ref, atol=1e-5)
    assert torch.equal(ids.reshape(-1, 2), indices)


def test_moe_backward_is_bit_reproducible_on_several_threads():
    """Each token is gathered once per chosen expert; the gradient of that gather sums its copies in a fixed
    order (index_select's index_add_), so two backward passes on 2 threads agree bit for bit (a plain
    x[index] gather accumulates its copies in a thread-dependent order, and pretraining drifted apart)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        cfg = dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=64, moe_intermediate_size=32)  # top-4 of 16
        moe = MoE(cfg, "model.layers.1.mlp")
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.3)
        x = torch.randn(64, 40, 64)

        def input_grad() -> torch.Tensor:
            xi = x.clone().requires_grad_(True)
            moe(xi)[0].pow(2).mean().backward()
            return xi.grad

        first = input_grad()
        assert all(torch.equal(first, input_grad()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


def test_moe_forward_and_backward_never_read_counts_on_the_host(monkeypatch):
    moe = MoE(_moe_config(), "model.layers.1.mlp").train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 11, 32, requires_grad=True)
    mask = torch.rand(3, 11) > 0.3

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the MoE forward")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    out, ids, _ = moe(x, token_mask=mask)
    out.sum().backward()
    monkeypatch.undo()
    expected = torch.bincount(ids[mask].flatten(), minlength=8).float()
    assert torch.equal(moe.expert_load, expected)  # load statistics count real tokens only


def test_state_dict_speaks_per_expert_hf_keys_and_round_trips():
    config = _moe_config(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    model = Transformer(config, seed=1)
    state = model.state_dict()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in state
    assert state["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (32, 16)
    assert not any(k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")) for k in state)
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert isinstance(experts, GroupedExperts)
    assert torch.equal(state["model.layers.1.mlp.experts.3.up_proj.weight"], experts.up_proj[3])
    other = Transformer(config, seed=2)
    other.load_state_dict(state)
    assert torch.equal(other.get_submodule("model.layers.1.mlp.experts").up_proj, experts.up_proj)
    partial = {k: v for k, v in state.items() if ".experts.5." not in k}
    result = other.load_state_dict(partial, strict=False)
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in result.missing_keys
