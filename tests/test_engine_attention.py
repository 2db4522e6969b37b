"""Absorbed MLA attention over the paged cache: the engine's torch path against the model's own absorbed
attention, and the Triton kernel (under Triton's interpreter on CPU) against the torch path."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from r1pipe.engine.paged_cache import PagedCache
from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.attention import absorbed_attention
from r1pipe.model.linear import dense_weight

# row 0: 11 keys over blocks [5, 2, 7]; row 1: 3 keys in block [3]; row 2: 6 keys sharing row 0's first block
TABLES = [[5, 2, 7], [3], [5, 4]]


def test_torch_path_is_the_models_absorbed_attention():
    c = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=1)
    mla = Transformer(c, seed=0).model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    H, B, S = c.num_attention_heads, 3, 2
    cache = PagedCache(1, 8, 4, (c.kv_lora_rank, c.qk_rope_head_dim))
    for pool in cache.pools:
        pool.normal_(generator=g)
    positions = torch.tensor([[9, 10], [2, 0], [5, 0]])
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    q_nope = torch.randn(B, S, H, c.qk_nope_head_dim, generator=g)
    q_rope = torch.randn(B, S, H, c.qk_rope_head_dim, generator=g)
    latent, k_rope = torch.randn(B, S, c.kv_lora_rank, generator=g), torch.randn(B, S, c.qk_rope_head_dim, generator=g)
    cache.plan(TABLES, positions, valid)
    with torch.no_grad():
        w = dense_weight(mla.kv_b_proj).view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w[:, : c.qk_nope_head_dim])
        gathered = absorbed_attention(q_latent, q_rope, *cache.update(0, latent, k_rope, positions), c.softmax_scale)
        expected = torch.einsum("bshc,hdc->bshd", gathered, w[:, c.qk_nope_head_dim:])
        got = mla._absorbed(q_nope, q_rope, latent, k_rope, positions, cache)  # the model calls cache.attend
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)  # padding queries: don't care
    assert cache.attention_backend == "torch"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        PagedCache(1, 4, 4, (8, 4), attention_backend="flash")


CHECKS = textwrap.dedent('''
    import json, torch
    from r1pipe.engine.paged_cache import PagedCache

    TABLES = %s
    g = torch.Generator().manual_seed(0)
    report = {}

    def compare(name, H, C, R, positions, valid, dtype, block_size=4):
        pools = {}
        outs = {}
        B, S = positions.shape
        ql = torch.randn(B, S, H, C, generator=g).to(dtype)
        qr = torch.randn(B, S, H, R, generator=g).to(dtype)
        lat, kr = torch.randn(B, S, C, generator=g).to(dtype), torch.randn(B, S, R, generator=g).to(dtype)
        kv0 = torch.randn(2, 9 * block_size, C, generator=g).to(dtype)
        pe0 = torch.randn(2, 9 * block_size, R, generator=g).to(dtype)
        for backend in ("torch", "triton"):
            cache = PagedCache(2, 9, block_size, (C, R), dtype=dtype, attention_backend=backend)
            cache.pools[0][:, 0].copy_(kv0)
            cache.pools[1][:, 0].copy_(pe0)
            cache.plan(TABLES, positions, valid)
            outs[backend] = cache.attend(1, ql, qr, lat, kr, 0.3).float()
            pools[backend] = cache.pools[0]
        ref, out = outs["torch"][valid], outs["triton"][valid]  # padding queries' outputs are never used
        report[name] = dict(err=((out - ref).abs().max() / ref.abs().max()).item(),
                            pool_same=torch.equal(pools["torch"], pools["triton"]), finite=bool(out.isfinite().all()))

    ones = lambda b, s: torch.ones(b, s, dtype=torch.bool)
    # decode: one token per row at ragged lengths
    compare("decode", 4, 64, 16, torch.tensor([[10], [2], [5]]), ones(3, 1), torch.float32)
    # odd sizes: 5 heads, latent 48, rope 8 (masked lanes in every dimension)
    compare("odd_sizes", 5, 48, 8, torch.tensor([[10], [2], [5]]), ones(3, 1), torch.float32)
    # speculative verify: 3 queries per row, one row finished (feeds only its first)
    valid = torch.tensor([[True] * 3, [True] * 3, [True, False, False]])
    compare("verify", 4, 64, 16, torch.tensor([[8, 9, 10], [0, 1, 2], [5, 0, 0]]) * valid, valid, torch.float32)
    # prefill: 7 queries per row, rows padded after 7, 3 and 5 tokens
    compare("prefill_padded", 4, 64, 16, torch.arange(7).expand(3, 7) * (torch.arange(7) < torch.tensor([[7], [3], [5]])),
            torch.arange(7) < torch.tensor([[7], [3], [5]]), torch.float32)
    # half precision: fp16 (the interpreter's tl.dot is wrong for bf16; bf16 is checked on a GPU)
    compare("fp16", 4, 64, 16, torch.tensor([[10], [2], [5]]), ones(3, 1), torch.float16)
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("triton")
    long_tables = [[5, 2, 7, 1, 8, 6], [3], [5, 4]]  # 8-token blocks: row 0 holds 48 keys (3 tiles of 16)
    script = CHECKS % json.dumps(TABLES) + textwrap.dedent(f'''
        TABLES = {json.dumps(long_tables)}
        compare("long_rows", 4, 64, 16, torch.tensor([[40], [7], [12]]), ones(3, 1), torch.float32, block_size=8)
        print(json.dumps(report))
    ''')
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["decode", "odd_sizes", "verify", "prefill_padded", "long_rows"])
def test_triton_kernel_matches_torch_path_fp32(report, case):
    r = report[case]
    assert r["err"] < 1e-5 and r["pool_same"] and r["finite"]


def test_triton_kernel_fp16(report):
    r = report["fp16"]
    assert r["err"] < 5e-3 and r["pool_same"] and r["finite"]
