"""Training-side behaviour: aux-loss-free balancing, gate weights, routing replay, balance loss, MTP learning."""
from __future__ import annotations

import dataclasses

import torch

from r1pipe.model import ModelConfig, Transformer, lm_loss
from r1pipe.model.moe import MoE


def router_config(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=32, moe_intermediate_size=8,
                               n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, **overrides)


def skewed_router(seed: int) -> tuple[MoE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(router_config(), "model.layers.1.mlp")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    offset = 0.7 * torch.randn(32, generator=g)  # every token leans the same way: a few experts win everything
    return moe, offset


def balanced_max_violation(gamma: float, steps: int = 200) -> float:
    """Train-mode forwards with a bias update after each, then MaxVio measured on 4096 fresh tokens."""
    moe, offset = skewed_router(0)
    moe.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            moe(torch.randn(4, 32, 32, generator=g) + offset)
            moe.update_bias(gamma)
        moe(torch.randn(4, 1024, 32, generator=g) + offset)
        return moe.update_bias(0.0)  # gamma 0: only reports



def test_bias_balancing_lowers_max_violation():
    unbalanced = balanced_max_violation(gamma=0.0, steps=1)
    balanced = balanced_max_violation(gamma=0.005)
    assert unbalanced > 1.0  # the skew really overloads some experts (MaxVio 1.33 here)
    assert balanced < 0.3 * unbalanced, (unbalanced, balanced)  # ~0.1 after 200 updates


def test_gate_weights_never_depend_on_the_bias():
    moe, offset = skewed_router(2)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) + offset
    with torch.no_grad():
        weights, ids, scores = moe.gate(x)
        moe.gate.e_score_correction_bias.copy_(torch.randn(16))  # a very different bias
        weights2, ids2, _ = moe.gate(x, routing=ids)
        _, ids3, _ = moe.gate(x)
    assert torch.equal(ids2, ids) and torch.equal(weights, weights2)
    assert not torch.equal(ids3.sort(-1).values, ids.sort(-1).values)  # the bias did change selection
    # by hand: sigmoid affinities of the chosen experts, normalised, times routed_scaling_factor
    affinity = torch.sigmoid(x @ moe.gate.weight.T).gather(1, ids)
    assert torch.allclose(weights, affinity / affinity.sum(-1, keepdim=True) * 2.5, atol=1e-6)
    # group limit: the chosen experts lie in at most topk_group of the n_group groups
    assert all(len(set((row // 4).tolist())) <= 2 for row in ids)


def test_routing_replay_reproduces_logits_and_bias_only_moves_selection():
    model = Transformer(ModelConfig.preset("tiny"), seed=4).eval()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = model(ids, return_routing=True)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(6))
        replayed = model(ids, routing=first.routing, return_routing=True)
        rerouted = model(ids, return_routing=True)
    assert all(torch.equal(a, b) for a, b in zip(first.routing, replayed.routing))
    assert torch.allclose(first.logits, replayed.logits, atol=1e-6)
    assert not torch.allclose(first.logits, rerouted.logits, atol=1e-4)


def test_expert_load_counts_training_tokens_only():
    model = Transformer(ModelConfig.preset("tiny"))
    ids = torch.randint(0, 512, (2, 6))
    mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    model.eval()
    model(ids)
    assert all(load.sum() == 0 for load in model.expert_load())
    model.train()
    model(ids, attention_mask=mask, mtp=True)
    loads = model.expert_load()
    # 3 main MoE layers count the 10 real tokens; the MTP one the 8 that have a next token to read
    assert len(loads) == 4 and [float(load.sum()) for load in loads] == [10 * 4] * 3 + [8 * 4]
    vios = model.update_router_bias()
    assert len(vios) == 4 and all(v >= 0 for v in vios)
    assert all(load.sum() == 0 for load in model.expert_load())


def test_sequence_balance_loss_has_gradient():
    model = Transformer(dataclasses.replace(ModelConfig.preset("tiny"), seq_aux_alpha=0.01))
    out = model(torch.randint(0, 512, (2, 8)))
    assert out.aux_loss > 0
    out.aux_loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0


def test_mtp_head_learns_next_next_token():
    vocab, period = 48, 24
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                 intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_group=2,
                                 topk_group=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2)
    g = torch.Generator().manual_seed(7)
    pattern = torch.randperm(vocab, generator=g)[:period]  # a fixed cycle: token t+2 is determined by token t+1
    model = Transformer(config, seed=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    def held_out_accuracy() -> float:  # every start of the cycle once
        model.eval()
        with torch.no_grad():
            ids = pattern[(torch.arange(period)[:, None] + torch.arange(16)) % period]
            return lm_loss(model(ids, mtp=True), ids)[1]["mtp0_accuracy"]

    accuracy = [held_out_accuracy()]
    for step in range(300):
        starts = torch.randint(0, period, (8, 1), generator=g)
        ids = pattern[(starts + torch.arange(16)) % period]
        model.train()
        loss, metrics = lm_loss(model(ids, mtp=True), ids, mtp_lambda=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_router_bias()
        if step % 5 == 4:
            accuracy.append(held_out_accuracy())
            if accuracy[-1] > 0.95:
                break
    assert accuracy[0] < 0.2 and accuracy[-1] > 0.95, accuracy  # chance is 1/48
