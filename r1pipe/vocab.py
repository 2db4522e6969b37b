"""The names a recipe chooses from, in one torch-free module.

Recipes are validated (`r1pipe.config.load_recipe`, `r1pipe run --dry-run`) without importing torch,
transformers or Ray, so every closed vocabulary a config checks lives here, and the module that gives
each name its meaning imports it from here: model presets (`r1pipe.model.config`, `r1pipe.causal_lm`),
compute dtypes (`r1pipe.model.precision`), GRPO loss aggregations and surrogates (`r1pipe.algo.losses`) and
advantage estimators (`r1pipe.algo.advantages`), generation engine backends (`r1pipe.engine.backend`).
"""
from __future__ import annotations

from typing import Any

# r1pipe's DeepSeek-V3 presets: ModelConfig fields over its defaults (the defaults are DeepSeek-V3's).
PRESETS: dict[str, dict[str, Any]] = {
    # The real DeepSeek-V3 / R1 shape (671B + 14B MTP), bf16 weights.
    "deepseek-v3": dict(
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # A 16B-total / ~2.5B-activated V3-architecture model: DeepSeek-V2-Lite's published layer shape (its
    # config.json: 27 layers, hidden 2048, 16 heads, q_lora_rank null, kv_lora_rank 512, 64 routed experts top-6
    # in one group, 2 shared, moe_intermediate 1408, intermediate 10944, first_k_dense_replace 1), the size
    # class of Moonshot's Moonlight-16B-A3B, with DeepSeek-V3's tokenizer vocabulary, sigmoid router, YaRN
    # context and one MTP module. Shape only: `r1pipe plan` and `r1pipe model info` read it, nothing is shipped.
    "v3-16b-a3b": dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # ~2.4 M parameters: 4 layers (3 MoE, n_group 4), 16 routed experts, 1 MTP module; fast on a laptop CPU.
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
        routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None, num_nextn_predict_layers=1,
        torch_dtype="float32",
    ),
}

# Dense students through transformers: config fields. The tiny ones (~0.1-0.3 M parameters besides the
# embedding) are for CPU tests and the distillation recipes; a preset sized to the tokenizer takes its vocabulary.
DENSE_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2-7B's layer shape and vocabulary (as in its published config.json; Qwen2.5-7B and Qwen2.5-Math-7B
    # share them): 7.6B parameters, GQA with 4 KV heads, q/k/v biases; the context set to 32768 here. For
    # `r1pipe plan` (sizes, no weights) of a 7B distillation student.
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1000000.0),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, rope_theta=10000.0),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, rope_theta=10000.0),
}

# `model.dtype` spellings -> the torch dtype's name (master weights stay fp32 whatever is chosen).
DTYPE_NAMES: dict[str, str] = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# How the GRPO loss averages token terms (r1pipe.algo.losses.aggregate).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The policy-gradient surrogate (`rl.algorithm.loss`, r1pipe.algo.losses.policy_surrogate).
POLICY_LOSSES = ("grpo", "gspo", "cispo")
# How rewards become advantages (`rl.algorithm.advantage`, r1pipe.algo.advantages.compute_advantages).
ADVANTAGE_ESTIMATORS = ("grpo", "dr-grpo", "rloo", "reinforce++")
# What generates (`rl.rollout.backend`, `rejection_sample.backend`, `r1pipe eval --backend`; r1pipe.engine.backend.open_engine):
# r1pipe's own engine (r1pipe.engine.LLM) or vLLM (r1pipe.engine.vllm_backend.VLLMEngine, GPU, optional).
ENGINE_BACKENDS = ("engine", "vllm")


def dtype_name(name: str, key: str = "model.dtype") -> str:
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' (any case, optional 'torch.') -> 'float32' or 'bfloat16';
    anything else is a ValueError naming `key` and the accepted names."""
    if isinstance(name, str):
        cleaned = name.strip().lower().removeprefix("torch.")
        if cleaned in DTYPE_NAMES:
            return DTYPE_NAMES[cleaned]
    raise ValueError(f"{key}: unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")


def check_preset(name: str, key: str = "preset") -> None:
    """A ValueError naming `key` unless `name` is a V3 preset or a dense preset."""
    if name not in PRESETS and name not in DENSE_PRESETS:
        raise ValueError(f"{key}={name!r}: choose an r1pipe DeepSeek-V3 preset ({', '.join(PRESETS)}) "
                         f"or a dense preset ({', '.join(DENSE_PRESETS)})")
