"""Checkpoint I/O: official FP8 checkpoints, meta-device loading, config.json round trips and errors."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from r1pipe.model import ModelConfig, Transformer, dequantize_blocks, load_pretrained, save_pretrained

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max




def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-side reference quantizer: per 128x128 block, scale = amax / 448, fp8 = w / scale."""
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
    return q, scale_inv


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**ModelConfig.preset("tiny").__dict__, "hidden_size": 160, "intermediate_size": 288,
                          "vocab_size": 101, **overrides})


def test_official_fp8_checkpoint_loads_dequantized(tmp_path):
    config = small_config()
    source = Transformer(config, seed=1)
    fp8_tensors, plain, dequantized = {}, {}, {}
    for name, t in source.state_dict().items():
        is_projection = t.dim() == 2 and name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")
        if is_projection:
            q, s = quantize_blocks(t)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = q, s
            dequantized[name] = q.float() * s.repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
        else:
            plain[name] = t.clone()
            dequantized[name] = t
    assert len(fp8_tensors) > 50
    # the official layout: scales may sit in another shard than their weight
    weights = {k: v for k, v in fp8_tensors.items() if not k.endswith("_scale_inv")}
    scales = {k: v for k, v in fp8_tensors.items() if k.endswith("_scale_inv")}
    save_file(weights, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({**scales, **plain}, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in weights}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in [*scales, *plain]}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_json = config.to_dict() | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                              "activation_scheme": "dynamic",
                                                              "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(config_json))

    loaded = load_pretrained(tmp_path).eval()
    reference = Transformer(config).eval()
    reference.load_state_dict(dequantized)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert not torch.equal(dequantized[name], source.state_dict()[name])  # quantization really happened
    assert torch.equal(loaded.state_dict()[name], dequantized[name])
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - reference(ids).logits).abs().max() <= 1e-5
    assert loaded.config.quantization_config is None  # what is in memory is no longer FP8


def test_dequantize_blocks_partial_edges():
    w = torch.randn(200, 130)
    q, s = quantize_blocks(w)
    assert s.shape == (2, 2)
    deq = dequantize_blocks(q, s)
    assert deq.shape == w.shape and (deq - w).abs().max() <= 0.07 * w.abs().max()


def test_meta_device_builds_without_memory(tmp_path):
    config = ModelConfig.preset("tiny")
    save_pretrained(Transformer(config), tmp_path)
    model = load_pretrained(tmp_path, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == Transformer(config).num_parameters()


def test_bf16_load_keeps_router_bias_fp32(tmp_path):
    model = Transformer(ModelConfig.preset("tiny"))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.model.layers[4].embed_tokens.weight is loaded.model.embed_tokens.weight  # MTP shares it
    with torch.no_grad():
        out = loaded(torch.randint(0, 512, (1, 8)), mtp=True)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.mtp_logits[0]).all()


def test_config_round_trip_and_errors():
    config = ModelConfig.preset("deepseek-v3")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "fp8" not in config.to_dict()  # r1pipe's own fields appear only when set
    assert ModelConfig.from_dict({**config.to_dict(), "mtp_lambda": 0.1}).to_dict()["mtp_lambda"] == 0.1
    with pytest.raises(ValueError, match="n_routd_experts"):
        ModelConfig.from_dict({**config.to_dict(), "n_routd_experts": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig(n_routed_experts=10, n_group=4)


def test_missing_tensor_is_named(tmp_path):
    model = Transformer(ModelConfig.preset("tiny"))
    save_pretrained(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="o_proj"):
        load_pretrained(tmp_path)


def test_reads_the_official_deepseek_v3_config():
    official = {  # config.json of deepseek-ai/DeepSeek-V3 (weights not needed)
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
        "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                        "quant_method": "fp8", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
    config = ModelConfig.from_dict(official)
    preset = ModelConfig.preset("deepseek-v3")
    assert dataclasses.replace(config, quantization_config=None, rope_scaling=preset.rope_scaling) == preset
    # softmax scale: 1/sqrt(192) * (0.1 ln 40 + 1)^2
    assert math.isclose(config.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
