"""The capture-safe decode step: the V3 decode forward compiles whole (torch.compile fullgraph, no graph
break, so no host synchronisation), its shapes are static within a batch-size bucket (a second step of the
bucket does not recompile), and it computes what the eager engine forward computes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from r1pipe.engine import LLM
from r1pipe.engine.runner import Batch, decode_buckets
from r1pipe.model import ModelConfig, Transformer


def test_decode_buckets_by_hand():
    assert decode_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
    assert decode_buckets(6) == [1, 2, 4, 6] and decode_buckets(1) == [1]


def test_cuda_graphs_on_a_cpu_engine_is_refused():
    model = Transformer(dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=1), seed=0)
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLM(model, num_blocks=8, cuda_graphs=True)
    assert LLM(model, num_blocks=8).cuda_graphs is False  # default: on exactly on CUDA


def test_v3_decode_step_compiles_fullgraph_and_matches_the_eager_forward():
    torch._dynamo.reset()
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, first_k_dense_replace=1)
    llm = LLM(Transformer(config, seed=3).eval(), block_size=4, num_blocks=16, max_num_seqs=8, max_model_len=24)
    runner, cache = llm.runner, llm.cache
    g = torch.Generator().manual_seed(0)
    for pool in cache.pools:  # earlier tokens' latents and keys in every block
        pool.copy_(torch.randn(pool.shape, generator=g))
    step = torch.compile(runner.decode_forward, fullgraph=True, backend="eager")  # a graph break raises
    steps = [Batch.decode([5, 9, 3], [4, 7, 2], [[1, 2], [3, 4], [5]]),  # 3 rows: bucket 4, one padding row
             Batch.decode([11, 4, 6], [5, 9, 3], [[1, 2], [3, 4, 6], [5]])]
    for i, batch in enumerate(steps):
        pools = [pool.clone() for pool in cache.pools]
        with torch.inference_mode():
            eager = runner.forward(batch, routing=True)  # the engine's own (dynamic-width) forward
            for pool, saved in zip(cache.pools, pools):
                pool.copy_(saved)
            padded = runner.plan_static(batch)
            assert padded.ids.shape == (4, 1) and cache._shape == (4, 1, runner.table_width * 4)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):  # static shapes within the bucket
                logits, routing = step(padded.ids, padded.positions)
        assert torch.allclose(logits[:3], eager.logits[:, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(routing[:, :3], torch.stack(eager.routing)[:, :, 0])
