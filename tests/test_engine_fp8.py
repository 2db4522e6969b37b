"""FP8 rollouts (LLM(fp8=True), recipe key rl.rollout.engine.fp8): the engine holds V3's projections as FP8 128x128
blocks; its greedy output is the torch reference FP8 model's (the model's own cached decode path, step by
step), its log-probs stay within a stated tolerance of the bf16 engine's, and weight updates quantize on the
way in."""
from __future__ import annotations

import copy

import torch
from fp8_reference import PROMPTS, cached_decode, fp8_test_model

from r1pipe.config import load_recipe, stage_config
from r1pipe.engine import LLM, SamplingParams
from r1pipe.model.fp8 import FP8_DTYPE, FP8Linear, weight_quant
from r1pipe.model.precision import hold_fp8_weights
from r1pipe.stages.base import StageContext
from r1pipe.stages.grpo import GRPOTrainer

# |log-prob| of the FP8 engine's sampled tokens against the bf16 engine's on the same tokens, on this random model
# (initializer_range 0.06: log-probs spread with std ~0.66): measured mean 0.069, max 0.50
FP8_VS_BF16_MEAN, FP8_VS_BF16_MAX = 0.1, 1.0


def test_fp8_engine_holds_fp8_projections_and_leaves_the_given_model_alone():
    model = fp8_test_model()
    llm = LLM(model, num_blocks=64, fp8=True)
    fp8 = [m for m in llm.model.modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(m.holds_fp8_weight for m in fp8)
    assert all(moe.experts.holds_fp8_weight for moe in llm.model.moe_layers())
    assert llm.model.lm_head.weight.dtype == torch.float32 and llm.model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(isinstance(m, FP8Linear) for m in model.modules())  # the caller's model is untouched


def test_fp8_engine_greedy_equals_the_reference_fp8fp8_test_model():
    model = fp8_test_model()
    reference = copy.deepcopy(model)
    hold_fp8_weights(reference)
    outs = LLM(model, num_blocks=64, block_size=4, fp8=True).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logps = cached_decode(reference, prompt, 12)
        assert out.outputs[0].token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.outputs[0].logprobs, logps)) < 1e-4


def test_fp8_engine_logprobs_stay_close_to_the_bf16_engine():
    """The FP8 engine's sampled tokens scored by the bf16 engine's computation (the bf16 model's cached decode
    path, fed the same tokens): mean and max |log-prob difference| within FP8_VS_BF16_*."""
    model = fp8_test_model()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=3, ignore_eos=True)
    outs = LLM(model, dtype="bfloat16", num_blocks=128, fp8=True).generate(PROMPTS, sp, use_tqdm=False)
    diffs = []
    for prompt, out in zip(PROMPTS, outs):
        for c in out.outputs:
            _, logps = cached_decode(bf16, prompt, 0, forced=c.token_ids)
            diffs += [abs(a - b) for a, b in zip(c.logprobs, logps)]
    diffs = torch.tensor(diffs)
    assert len(diffs) == 12 * 16
    assert float(diffs.mean()) < FP8_VS_BF16_MEAN and float(diffs.max()) < FP8_VS_BF16_MAX, (diffs.mean(), diffs.max())
    assert float(diffs.mean()) > 1e-3  # the FP8 engine really computes differently


def test_fp8_engine_weight_updates_quantize_on_the_way_in():
    model = fp8_test_model()
    llm = LLM(model, num_blocks=64, fp8=True)
    new = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    assert llm.update_weights(new) == len(new)
    own = llm.model.state_dict()
    for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"):
        q, s = weight_quant(new[name])
        assert own[name].dtype == FP8_DTYPE and torch.equal(own[name].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(own[name + "_scale_inv"], s)
    # the engine now generates as a fresh FP8 engine on the new weights
    model.load_state_dict(new)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fresh = LLM(model, num_blocks=64, fp8=True).generate(PROMPTS, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in fresh]


def test_fp8_rollouts_switch_tis_on(tmp_path):
    """rl.rollout.engine.fp8 turns token-level TIS on by default, also over a float32 engine and model."""
    def tis(overrides: list[str]) -> bool:
        recipe = load_recipe("r1-zero-tiny", overrides)
        ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path, recipe=recipe, seed=0)
        return GRPOTrainer(stage_config(recipe, "rl"), ctx).tis

    assert tis(["model.dtype=float32"]) is False
    assert tis(["model.dtype=float32", "rl.rollout.engine.fp8=true"]) is True
