"""FP8 inside the model: config switch and exclusions, official-FP8 checkpoints kept in FP8, weight memory."""
import dataclasses

import torch
from torch import nn

from r1pipe.model import ModelConfig, Transformer, load_pretrained, save_pretrained
from r1pipe.model.fp8 import FP8Linear
from r1pipe.model.info import report


def _tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), **overrides)


def test_config_switch_and_exclusions():
    model = Transformer(_tiny(fp8=True, fp8_exclude=["*.self_attn.kv_b_proj", "model.layers.0.mlp*"]))
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert "model.layers.1.self_attn.o_proj" in fp8_names
    assert "model.layers.2.mlp.experts.3.down_proj" in fp8_names
    assert not any(n.endswith("kv_b_proj") or n.startswith("model.layers.0.mlp") for n in fp8_names)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.kv_b_proj"), nn.Linear)
    for high_precision in ("lm_head", "model.layers.2.mlp.gate"):  # output head and router stay out of FP8
        assert not isinstance(model.get_submodule(high_precision), FP8Linear)
    assert not any(isinstance(m, FP8Linear) for m in Transformer(_tiny()).modules())


def test_official_fp8_checkpoint_kept_in_fp8(tmp_path):
    source = Transformer(_tiny(fp8=True), seed=1)
    for module in source.modules():
        if isinstance(module, FP8Linear):
            module.quantize_weight_()  # the official layout: float8 weight + weight_scale_inv per 128x128 block
    save_pretrained(source, tmp_path)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(ids).logits

    model = load_pretrained(tmp_path, fp8_weights=True)
    quantized = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert quantized and all(m.holds_fp8_weight for m in quantized)
    held = sum(m.weight.numel() * m.weight.element_size() + m.weight_scale_inv.numel() * 4 for m in quantized)
    budget = sum(m.weight.numel() + 4 * m.weight_scale_inv.numel() for m in quantized)  # 1 byte/param + scales
    assert held <= 1.05 * budget
    bf16_bytes = sum(2 * m.weight.numel() for m in quantized)
    assert held < 0.6 * bf16_bytes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # same FP8 weights, same GEMMs

    dequantized = load_pretrained(tmp_path, fp8_weights=False)
    assert not any(getattr(m, "holds_fp8_weight", False) for m in dequantized.modules())
    with torch.no_grad():
        got = dequantized(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 0.05


def test_info_reports_fp8_weight_memory():
    config = _tiny(fp8=True, fp8_exclude=["*.kv_b_proj"])
    model = Transformer(config)
    main_layers = tuple(f"model.layers.{i}." for i in range(config.num_hidden_layers))
    quantized = [m for n, m in model.named_modules() if isinstance(m, FP8Linear) and n.startswith(main_layers)]
    for module in quantized:
        module.quantize_weight_()
    r = report(config)
    assert r["fp8_quantized_params"] == sum(m.weight.numel() for m in quantized)
    assert r["fp8_scale_blocks"] == sum(m.weight_scale_inv.numel() for m in quantized)
    saved = r["fp8_quantized_params"] - 4 * r["fp8_scale_blocks"]  # 1 byte instead of 2, minus the scales
    assert r["weight_bytes_fp8"] == r["weight_bytes_bf16"] - saved
    real = report(ModelConfig.preset("deepseek-v3"))
    assert 0.5 < real["weight_bytes_fp8"] / real["weight_bytes_bf16"] < 0.52  # ~all of 671B is projections
