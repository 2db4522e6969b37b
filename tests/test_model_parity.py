"""Logit parity with transformers' DeepseekV3ForCausalLM, both directions, and latent-cache decoding."""
from __future__ import annotations

import json

import pytest
import torch

from r1pipe.model import DenseLatentCache, ModelConfig, Transformer, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.7}




def hf_config(q_lora_rank: int | None, rope_interleave: bool = True):
    return transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=4,
        topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=128, rope_theta=10000.0, rope_scaling=dict(YARN), rope_interleave=rope_interleave,
        num_nextn_predict_layers=1, attn_implementation="eager")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention and routing are far from uniform; a non-zero selection bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def inputs(seed: int = 1, batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[16, None], ids=["q_lora", "no_q_lora"])
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)  # transformers' own init draws from the global generator
    model = transformers.DeepseekV3ForCausalLM(hf_config(request.param, rope_interleave=request.param is not None))
    randomize(model, seed=3)
    model.eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(inputs()).logits
    return path, logits


def test_loads_transformers_checkpoint_with_same_logits(hf_checkpoint):
    path, hf_logits = hf_checkpoint
    model = load_pretrained(path).eval()
    assert model.config.n_group == 4 and model.config.yarn is not None
    biases = [moe.gate.e_score_correction_bias for moe in model.moe_layers(include_mtp=False)]
    assert all(b.abs().min() > 0 for b in biases)
    with torch.no_grad():
        out = model(inputs(), return_routing=True)
    assert out.logits.dtype == torch.float32
    assert (out.logits - hf_logits).abs().max() <= 1e-4
    # the bias really changes which experts are chosen here (otherwise the test would not cover it)
    with torch.no_grad():
        for b in biases:
            b.zero_()
        unbiased = model(inputs(), return_routing=True).routing
    assert any((r.sort(-1).values != u.sort(-1).values).any() for r, u in zip(out.routing, unbiased))


def test_transformers_loads_our_checkpoint_with_same_logits(tmp_path):
    config = ModelConfig.from_dict(hf_config(16).to_dict())
    model = Transformer(config, seed=5)
    randomize(model, seed=7)
    model.eval()
    save_pretrained(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]  # the MTP module is stored
    assert "model.layers.3.shared_head.head.weight" in index["weight_map"]
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(inputs()).logits
        theirs = hf(inputs()).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # and back: our loader reads our own checkpoint, MTP included
    again = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(inputs(), mtp=True), again(inputs(), mtp=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_latent_cache_decoding_matches_full_forward(q_lora_rank):
    config = ModelConfig.from_dict(hf_config(q_lora_rank).to_dict())
    model = Transformer(config)
    randomize(model, seed=11)
    model.eval()
    ids = inputs(seq=20)
    cache = DenseLatentCache(config, batch_size=2, max_len=24)
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :5], cache=cache).logits  # a prompt at once, then one token at a time
        steps = [model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits for t in range(5, 20)]
    decoded = torch.cat([prefill] + steps, dim=1)
    assert (decoded - full).abs().max() <= 1e-4
    # exactly kv_lora_rank + qk_rope_head_dim values per token per layer
    per_token = cache.kv_latent.shape[-1] + cache.k_rope.shape[-1]
    assert per_token == config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.kv_latent.shape[:3] == cache.k_rope.shape[:3] == (config.num_layers_with_mtp, 2, 24)


def test_left_padding_gives_the_unpadded_logits():
    config = ModelConfig.from_dict(hf_config(16).to_dict())
    model = Transformer(config)
    randomize(model, seed=13)
    model.eval()
    ids = inputs(seq=12)
    short = ids[1:, 4:]  # row 1 is 8 tokens long: left-pad it to 12
    batch = ids.clone()
    batch[1, :4] = 0
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        alone = model(short).logits[0]
        padded = model(batch, attention_mask=mask).logits[1, 4:]
        cache = DenseLatentCache(config, batch_size=2, max_len=16)
        prompt = model(batch[:, :10], attention_mask=mask[:, :10], cache=cache).logits[1, 4:]
        step = model(batch[:, 10:], positions=torch.tensor([[10, 11], [10, 11]]), cache=cache).logits[1]
    assert (padded - alone).abs().max() <= 1e-4
    assert (torch.cat([prompt, step]) - alone).abs().max() <= 1e-4
