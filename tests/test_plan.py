"""`r1pipe plan`: its weight, gradient and optimizer bytes against what a real step holds, the fit decision and
the smallest layout on hand-checked numbers, the recipe's ep_size keys, and its errors through the CLI.

Measurement: a model is built on the CPU in fp32, one forward and backward on a few tokens and one fused AdamW
step run (as r1pipe.workers.policy builds it), and the bytes are summed over the tensors it then holds with
r1pipe.workers.sharding.local_bytes (parameters, optimizer state) and tensor_bytes (the .grad of every
parameter). A single unsharded worker holds them whole, as the plan's TrainerSetup(workers=1) says."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.cli import main as cli_main, usage
from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.info import dense_parameter_count, parameter_counts
from r1pipe.plan.layout import Role, nodes_needed, place, smallest_trainer
from r1pipe.plan.memory import GiB, TrainerSetup, trainer_memory
from r1pipe.plan.report import plan_stage
from r1pipe.plan.shapes import config_shape, preset_shape, v3_shape
from r1pipe.plan.stages import load, plan_stages
from r1pipe.vocab import DENSE_PRESETS
from r1pipe.workers.sharding import local_bytes, tensor_bytes

# a mid-size V3 (~44 M parameters, 180 MB in fp32): four layers, three of them MoE, and one MTP module
MID_V3 = dict(vocab_size=16000, hidden_size=384, intermediate_size=1024, moe_intermediate_size=384, num_hidden_layers=4,
              num_attention_heads=6, num_key_value_heads=6, n_routed_experts=16, n_shared_experts=1,
              num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=192,
              kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=512,
              rope_scaling=None, num_nextn_predict_layers=1)


def measured_step(model: torch.nn.Module, loss_fn) -> dict[str, int]:
    """Bytes held after one forward, backward and fused AdamW step: parameters, gradients, optimizer state."""
    loss_fn(model).backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    optimizer.step()
    held = local_bytes(model, optimizer)
    held["gradients"] = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    return held


def assert_close(plan: float, measured: float, what: str) -> None:
    assert measured > 0 and abs(plan / measured - 1) < 0.10, f"{what}: plan {plan:,.0f} B vs measured {measured:,.0f} B"


def v3_loss(mtp: bool):
    def loss(model: Transformer) -> torch.Tensor:
        ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        out = model(ids, mtp=mtp)
        return out.logits.float().mean() + sum(l.float().mean() for l in out.mtp_logits)
    return loss


@pytest.mark.parametrize("fields, mtp", [({}, True), ({}, False), (MID_V3, True)], ids=["tiny", "tiny-no-mtp", "mid"])
def test_v3_plan_agrees_with_a_measured_step(fields, mtp):
    config = ModelConfig(**{**ModelConfig.preset("tiny").__dict__, **fields}) if fields else ModelConfig.preset("tiny")
    measured = measured_step(Transformer(config, seed=0), v3_loss(mtp))
    m = trainer_memory(v3_shape(config, "test"), TrainerSetup(workers=1, rows=1, seq_len=12, trains_mtp=mtp))
    assert_close(m.masters, measured["parameters"], "parameters")
    assert_close(m.gradients, measured["gradients"], "gradients")
    assert_close(m.optimizer, measured["optimizer"], "optimizer")
    if not mtp:  # the MTP module gets no gradient, hence no AdamW state: the plan leaves it out of both
        assert m.gradients < m.masters


def test_dense_plan_agrees_with_a_measured_step(tmp_path):
    fields = {**DENSE_PRESETS["tiny-qwen2"], "vocab_size": 300}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.save_pretrained(tmp_path)  # the plan reads the config.json, as of a checkpoint directory
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    measured = measured_step(model, lambda m: m(input_ids=ids).logits.float().mean())
    shape = config_shape(tmp_path)
    assert shape.model_type == "qwen2" and shape.params == model.num_parameters()
    m = trainer_memory(shape, TrainerSetup(workers=1, rows=1, seq_len=12))
    assert_close(m.masters, measured["parameters"], "parameters")
    assert_close(m.gradients, measured["gradients"], "gradients")
    assert_close(m.optimizer, measured["optimizer"], "optimizer")


def test_dense_count_matches_transformers_qwen2_with_biases_and_llama_untied():
    for preset, overrides in (("tiny-qwen2", {}), ("tiny-llama", {"tie_word_embeddings": False, "attention_bias": True})):
        fields = {**DENSE_PRESETS[preset], "vocab_size": 320, **overrides}
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert preset_shape(preset, {"vocab_size": 320, **overrides}).params == model.num_parameters()
    assert round(dense_parameter_count(preset_shape("qwen2-7b").dense) / 1e9, 2) == 7.62  # Qwen2-7B's published 7.62B


def test_sharded_bytes_by_hand():
    """qwen2-7b over 8 FSDP workers: 4 + 4 + 8 bytes per parameter, divided by 8; ep_size leaves them and only
    shrinks what a V3 device gathers, by exactly the routed experts it no longer holds whole."""
    shape = preset_shape("qwen2-7b")
    P = 7_615_616_512
    assert shape.params == P
    m = trainer_memory(shape, TrainerSetup(workers=8, rows=1, seq_len=128))
    assert (m.masters, m.gradients, m.optimizer) == (4 * P / 8, 4 * P / 8, 8 * P / 8)
    # gathered: the root (embedding, head, final norm) and two blocks (current and prefetched), in bf16
    D, V, block = 3584, 152064, shape.blocks[0].params
    assert m.working == 2 * ((2 * V * D + D) + 2 * block)

    v3 = preset_shape("v3-16b-a3b")
    one, eight = (trainer_memory(v3, TrainerSetup(workers=8, rows=1, seq_len=128, ep_size=e)) for e in (1, 8))
    assert (one.masters, one.optimizer) == (eight.masters, eight.optimizer)
    experts = 64 * 3 * 2048 * 1408  # one MoE layer's routed experts; the root holds the MTP module's
    assert one.working - eight.working == pytest.approx(2 * 3 * experts * (1 - 1 / 8))


def test_fit_decision_and_the_smallest_layout(tmp_path):
    """A one-stage recipe whose budget is set between hand-known figures: it does not fit on one node, fits with
    the optimizer state offloaded on the same node, and without offload on two."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text("model: {preset: qwen2-7b, dtype: bfloat16}\nstages: [sft]\n"
                      "sft: {kind: sft, micro_batch_size: 1, batch_size: 64, data: {max_length: 128},\n"
                      "      resources: {device: cuda, trainer: {workers: 8, gpus: 1}}}\n")
    cfg = load(str(recipe), [])
    [stage] = plan_stages(cfg, prompt_tokens=0)
    trainer = stage.roles[0]
    at = lambda w, offload="none": trainer_memory(stage.model, dataclasses.replace(trainer.trainer, workers=w, offload=offload))  # noqa: E731
    eight, offloaded, sixteen = at(8).total, at(8, "optimizer").total, at(16).total
    assert offloaded == pytest.approx(eight - 8 * 7_615_616_512 / 8) and sixteen <= offloaded
    budget = (offloaded + eight) / 2  # between: offloading on 1 node fits, 8 workers as they are do not
    p = plan_stage(stage, gpus_per_node=8, gpu_memory_gib=budget / GiB, nodes=None)
    assert p.fits == {"bf16": False} and p.needed == 1
    first, second = p.layouts["bf16"]
    assert first.startswith("1 node(s): trainer 8 workers, ep_size 1, optimizer state offloaded")
    assert second.startswith("without offload: 2 node(s): trainer 16 workers")
    assert plan_stage(stage, 8, eight / GiB, None).fits == {"bf16": True}  # exactly the total: it fits


def test_layout_search_and_placement_by_hand():
    # bytes 100 / workers: budget 10 needs 10 workers, so 16 (two nodes of 8) without offload
    found = smallest_trainer(lambda w, ep, off: 100 / w, 10, 8, 1, 8, 0, lambda w: -(-w // 8))
    assert (found.workers, found.ep_size, found.offload) == (16, 1, "none")
    # ep_size lowers the bytes: the smallest ep_size that fits on the fewest nodes, dividing workers and experts
    found = smallest_trainer(lambda w, ep, off: 100 / w + 40 / ep, 20, 8, 1, 8, 64, lambda w: -(-w // 8))
    assert (found.workers, found.ep_size) == (8, 8)
    assert smallest_trainer(lambda w, ep, off: 1e9, 10, 8, 1, 8, 0, lambda w: 1) is None
    roles = [Role("trainer", 8, 1.0), Role("rollout", 4, 2.0)]
    assert nodes_needed(roles, 8) == 2
    assert place(roles, 1, 8) is None
    assert [[(s.role, s.first, s.count) for s in node] for node in place(roles, 2, 8)] == [
        [("trainer", 0, 8)], [("rollout", 0, 4)]]
    spread = place([Role("trainer", 4, 1.0)], 2, 8, "SPREAD")
    assert [[(s.first, s.count) for s in node] for node in spread] == [[(0, 1), (2, 1)], [(1, 1), (3, 1)]]


def test_the_recipes_ep_size_keys_are_read_and_checked():
    cfg = load("r1", ["reasoning_rl.parallelism.ep_size=8", "reasoning_rl.rollout.engine.ep_size=4",
                      "model.preset=v3-16b-a3b"])
    rl = next(s for s in plan_stages(cfg, 1024) if s.name == "reasoning_rl")
    assert [r.ep_size for r in rl.roles] == [8, 4]
    assert "2 engines of ep_size 4" in rl.roles[1].detail


@pytest.mark.parametrize("argv, names", [
    (["plan", "no-such-recipe"], "no-such-recipe"),
    (["plan", "r1", "--gpu-memory", "-5"], "--gpu-memory"),
    (["plan", "r1", "--nodes", "two"], "--nodes"),
    (["plan", "r1", "reasoning_rl.parallelism.ep_size=3"], "reasoning_rl.parallelism.ep_size=3"),
    (["plan", "r1", "reasoning_rl.rollout.engine.ep_size=0"], "ep_size"),
    (["plan", "r1", "eval.engine.ep_size=2"], "eval.engine"),
    (["plan", "r1", "reasoning_rl.no_such_key=1"], "no_such_key"),
    (["plan", "r1", "model.preset=no-such-preset"], "no-such-preset"),
])
def test_bad_input_is_one_line_and_status_2(argv, names, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and err[0].startswith("r1pipe plan: "), err


def test_plan_command_prints_every_stage(capsys):
    assert "r1pipe plan" in usage()
    assert cli_main(["plan", "r1", "model.preset=v3-16b-a3b", "--gpu-memory", "80", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    for stage in ("cold_start", "reasoning_rl", "rejection_sample", "sft", "all_rl", "eval"):
        assert f"stage {stage} (" in out
    assert "placement (PACK, 2 node(s) of 8 GPUs): node 0: trainer 0-7 | node 1: rollout 0-7" in out
    assert "fits in 80 GiB per GPU" in out and "smallest layout that fits, bf16" in out


def test_v3_16b_preset_is_the_v2_lite_layer_shape():
    c = ModelConfig.preset("v3-16b-a3b")
    lite = dataclasses.replace(c, vocab_size=102400, num_nextn_predict_layers=0)
    assert abs(parameter_counts(lite).total / 15.7e9 - 1) < 0.01  # DeepSeek-V2-Lite's published 15.7B
    assert round(parameter_counts(c).activated / 1e9, 1) == 2.5
    json.dumps(c.to_dict())  # a valid config.json
