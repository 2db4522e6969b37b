"""FP8 inside the model: config switch and exclusions, official-FP8 checkpoints kept in FP8, weight memory."""
import dataclasses
import json

import torch
from torch import nn

from r1pipe.model import ModelConfig, Transformer, load_pretrained, save_pretrained
from r1pipe.model.experts import GroupedExperts
from r1pipe.model.fp8 import FP8Linear


def _fp8_weights(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, weight_scale_inv) of an FP8Linear or of each projection of fp8 grouped experts."""
    if isinstance(module, FP8Linear):
        return [(module.weight, module.weight_scale_inv)]
    return [(getattr(module, p), getattr(module, p + "_scale_inv")) for p in ("gate_proj", "up_proj", "down_proj")]


def _is_fp8(module: nn.Module) -> bool:
    return isinstance(module, FP8Linear) or (isinstance(module, GroupedExperts) and module.fp8)
from r1pipe.model.info import report


def _tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), **overrides)


def test_config_switch_and_exclusions():
    model = Transformer(_tiny(fp8=True, fp8_exclude=["*.self_attn.kv_b_proj", "model.layers.0.mlp*"]))
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert "model.layers.1.self_attn.o_proj" in fp8_names
    assert model.get_submodule("model.layers.2.mlp.experts").fp8  # routed experts: one stacked module
    assert not model.get_submodule("model.layers.0.mlp").__class__.__name__ == "MoE"
    assert not any(n.endswith("kv_b_proj") or n.startswith("model.layers.0.mlp") for n in fp8_names)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.kv_b_proj"), nn.Linear)
    for high_precision in ("lm_head", "model.layers.2.mlp.gate"):  # output head and router stay out of FP8
        assert not isinstance(model.get_submodule(high_precision), FP8Linear)
    assert not any(isinstance(m, FP8Linear) for m in Transformer(_tiny()).modules())


def test_official_fp8_checkpoint_kept_in_fp8(tmp_path):
    source = Transformer(_tiny(fp8=True), seed=1)
    for module in source.modules():
        if _is_fp8(module):
            module.quantize_weight_()  # the official layout: float8 weight + weight_scale_inv per 128x128 block
    save_pretrained(source, tmp_path)
    with open(tmp_path / "model.safetensors.index.json") as f:
        keys = json.load(f)["weight_map"]
    assert "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv" in keys  # per-expert HF keys, FP8 blocks
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(ids).logits

    model = load_pretrained(tmp_path, fp8_weights=True)
    quantized = [m for m in model.modules() if _is_fp8(m)]
    assert any(isinstance(m, GroupedExperts) for m in quantized)
    assert quantized and all(m.holds_fp8_weight for m in quantized)
    pairs = [pair for m in quantized for pair in _fp8_weights(m)]
    held = sum(w.numel() * w.element_size() + s.numel() * 4 for w, s in pairs)
    budget = sum(w.numel() + 4 * s.numel() for w, s in pairs)  # 1 byte/param + scales
    assert held <= 1.05 * budget
    bf16_bytes = sum(2 * w.numel() for w, _ in pairs)
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
    quantized = [m for n, m in model.named_modules() if _is_fp8(m) and n.startswith(main_layers)]
    for module in quantized:
        module.quantize_weight_()
    pairs = [pair for m in quantized for pair in _fp8_weights(m)]
    r = report(config)
    assert r["fp8_quantized_params"] == sum(w.numel() for w, _ in pairs)
    assert r["fp8_scale_blocks"] == sum(s.numel() for _, s in pairs)
    saved = r["fp8_quantized_params"] - 4 * r["fp8_scale_blocks"]  # 1 byte instead of 2, minus the scales
    assert r["weight_bytes_fp8"] == r["weight_bytes_bf16"] - saved
    real = report(ModelConfig.preset("deepseek-v3"))
    assert 0.5 < real["weight_bytes_fp8"] / real["weight_bytes_bf16"] < 0.52  # ~all of 671B is projections
