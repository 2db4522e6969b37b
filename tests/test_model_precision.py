"""Recipe precision: dtype names, bf16 compute over fp32 masters, FP8 projections in the policy and engine."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from r1pipe.config import ConfigError, ModelConfigSection, load_recipe
from r1pipe.model import ModelConfig, Precision, Transformer, apply_precision, lm_loss, parse_dtype, save_pretrained
from r1pipe.model.experts import GroupedExperts
from r1pipe.model.fp8 import FP8Linear


def _small(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               moe_intermediate_size=32, vocab_size=64, **overrides)


def test_parse_dtype_names_and_errors():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32 and parse_dtype("torch.float32") is torch.float32
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype.*'float16'.*bfloat16"):
        parse_dtype("float16")
    with pytest.raises(ValueError, match="rl.engine.dtype"):
        parse_dtype("bf61", key="rl.engine.dtype")
    with pytest.raises(ValueError, match="model.dtype"):
        ModelConfigSection(dtype="half")


def test_recipe_precision_keys_reach_precision():
    cfg = load_recipe("r1-zero", ["model.dtype=bfloat16", "model.fp8=true", "model.fp8_exclude=['*.kv_b_proj']"])
    p = Precision.from_section(cfg.model)
    assert p == Precision(torch.bfloat16, True, ["*.kv_b_proj"])
    with pytest.raises(ConfigError, match="model.fp8_excluded"):
        load_recipe("r1-zero", ["model.fp8_excluded=[x]"])
    with pytest.raises(ValueError, match="model.dtype"):
        Precision.from_section(load_recipe("r1-zero", ["model.dtype=fp16"]).model)


def test_apply_precision_swaps_projections_in_place_keeping_parameters():
    model = Transformer(_small())
    params = {n: p for n, p in model.named_parameters()}
    apply_precision(model, Precision(fp8=True, fp8_exclude=["*.kv_b_proj", "model.layers.0.mlp*"]))
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), FP8Linear)
    assert isinstance(model.get_submodule("model.layers.1.mlp.shared_experts.up_proj"), FP8Linear)
    assert model.get_submodule("model.layers.1.mlp.experts").fp8
    assert type(model.get_submodule("model.layers.1.self_attn.kv_b_proj")) is nn.Linear
    assert type(model.get_submodule("model.layers.0.mlp.gate_proj")) is nn.Linear
    assert type(model.lm_head) is nn.Linear and model.config.fp8 and model.config.fp8_exclude
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameters: optimizers stay valid
    apply_precision(model, Precision())
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert not model.get_submodule("model.layers.1.mlp.experts").fp8


def _train(model: Transformer, steps: int) -> tuple[list[float], torch.optim.Optimizer]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss, _ = lm_loss(model(ids, mtp=True), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias()
        losses.append(float(loss.detach()))
    return losses, opt


def test_bf16_recipe_trains_with_fp32_masters_and_optimizer_state():
    model = Transformer(_small(), seed=3)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = model(ids).logits
        apply_precision(model, Precision(dtype=torch.bfloat16))
        bf16 = model(ids).logits
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # the matmuls really ran in bf16
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.05
    losses, opt = _train(model, 12)
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.is_floating_point())
    assert sum(float(load.sum()) for load in model.expert_load()) == 0  # loads were consumed by the bias update
    assert any(float(m.gate.e_score_correction_bias.abs().sum()) > 0 for m in model.moe_layers())


def test_fp8_and_bf16_together_train():
    model = apply_precision(Transformer(_small(), seed=3), Precision(dtype=torch.bfloat16, fp8=True))
    losses, _ = _train(model, 8)
    assert losses[-1] < 0.9 * losses[0]


def _policy_batch(vocab: int):
    from r1pipe.data.batch import TrainBatch

    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(5))
    response = torch.zeros(4, 11)
    response[:, 5:] = 1
    return TrainBatch(ids, torch.ones(4, 12, dtype=torch.bool), response)


def test_policy_worker_holds_fp8_modules_and_trains(tmp_path):
    from r1pipe.workers.policy import PolicyConfig, PolicyWorker

    save_pretrained(Transformer(_small(), seed=4), tmp_path)
    worker = PolicyWorker(0, 1, str(tmp_path), PolicyConfig(lr=1e-3, precision=Precision(
        dtype=torch.bfloat16, fp8=True, fp8_exclude=["*.kv_b_proj"])), frozen_path=str(tmp_path))
    for model in (worker.model, worker.reference):
        assert isinstance(model.get_submodule("model.layers.1.self_attn.q_b_proj"), FP8Linear)
        assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), FP8Linear)
        assert model.get_submodule("model.layers.1.mlp.experts").fp8
        assert type(model.get_submodule("model.layers.1.self_attn.kv_b_proj")) is nn.Linear
        assert model.compute_dtype == torch.bfloat16
    batch = _policy_batch(64)
    old = worker.logprobs(batch)
    before = worker.model.get_submodule("model.layers.1.self_attn.q_b_proj").weight.detach().clone()
    stats = worker.train_step(batch, old, torch.randn(4), None, float(batch.response_mask.sum()), 4.0)
    assert stats["grad_norm"] > 0
    after = worker.model.get_submodule("model.layers.1.self_attn.q_b_proj").weight
    assert after.dtype == torch.float32 and not torch.equal(after, before)


def test_engine_takes_dtype_names(tmp_path):
    from r1pipe.engine import LLM, SamplingParams

    model = Transformer(_small(), seed=6)
    save_pretrained(model, tmp_path)
    llm = LLM(tmp_path, dtype="bfloat16", num_blocks=64, block_size=4)
    assert all(p.dtype == torch.bfloat16 for p in llm.model.parameters())
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="dtype.*'float64'"):
        LLM(tmp_path, dtype="float64")
