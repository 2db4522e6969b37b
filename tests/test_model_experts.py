"""Stacked routed experts: grouped GEMM against per-expert matmuls, HF per-expert keys, no host sync."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.experts import GroupedExperts, grouped_linear, segment_linear
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
    assert torch.allclose(segment_linear(x.detach(), w.detach(), _offsets(counts)).float(), ref.float(),
                          atol=tol, rtol=tol)


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
