"""An expert-parallel engine (engine option ep_size; r1pipe.engine.lockstep) against one whole engine.

Two processes on gloo, no Ray, the tiny V3 with 8 routed experts (4 held by each process): greedy and seeded
sampled completions equal one engine's token for token (log-probs within 1e-5: the experts' rows are summed in
another order), with MTP drafts too; a weight update into both processes (each keeps its own experts), by name
or by reading a sync's whole buckets in place, gives the same greedy completions as the update into one engine. Through Ray, a GenerationGroup of two workers forming
one engine returns what one LLM returns, blocking and streamed. The settings that rule expert parallelism out
are refused on the driver, naming the key."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1pipe.engine import LLM, SamplingParams
from r1pipe.engine.families import load_engine_model
from r1pipe.errors import ConfigError
from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.expert_parallel import ExpertShard
from r1pipe.model.experts import PROJECTIONS
from r1pipe.stages.configs import RejectionSampleConfig, Rollout
from r1pipe.stages.sections import SamplingResources, Workers
from r1pipe.workers.generation import GenerationGroup, Sampling
from r1pipe.workers.weight_sync import free_port, pack, plan_buckets, rehome, tensor_meta
from test_grpo_policy import tiny_mtp_model
from tiny_models import make_tiny_dense

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [3, 4, 5, 6, 7, 8, 9], [12, 13]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
SMALL = dict(max_num_seqs=8, max_model_len=64)  # a small cache


def new_weights(path: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A whole model's state dict (other random weights of the same shapes): what a sync would carry."""
    return Transformer(ModelConfig.from_pretrained(path), seed=seed).state_dict()


def shared_buckets(weights: dict[str, torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
    """The sync's bucket plan of `weights` and the flat buckets holding them (as the trainer shares them)."""
    buckets = plan_buckets([tensor_meta(n, t) for n, t in weights.items()], 1 << 20)
    return buckets, [pack([weights[m.name] for m in bucket]) for bucket in buckets]


def outputs(llm: LLM, params: SamplingParams) -> list[list[tuple[list[int], list[float]]]]:
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _engine_process(rank: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for k in (0, 2):
        llm = LLM(path, speculative_k=k, ep_size=2, **SMALL)
        experts = [m.experts for m in llm.model.moe_layers()]
        assert experts and all(list(e.held_experts) == list(range(4 * rank, 4 * rank + 4)) for e in experts)
        results[k] = [outputs(llm, GREEDY), outputs(llm, SAMPLED)]
    weights = new_weights(path)
    results["set"] = llm.update_weights(weights)
    results["updated"] = outputs(llm, GREEDY)
    flat = rehome(llm.model, *shared_buckets(new_weights(path, seed=2)), adopt=True)  # whole buckets read in place
    for view, tensor, _ in flat.loose:  # what SyncGroup.receive_flat then copies (the MTP's aliases)
        tensor.copy_(view)
    placed = {id(t) for t, _ in flat.placed}
    results["experts_placed"] = all(id(getattr(e, p)) in placed for e in experts for p in PROJECTIONS)
    results["adopted"] = outputs(llm, GREEDY)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        for (g_ids, g_lp), (w_ids, w_lp) in zip(g, w, strict=True):
            assert g_ids == w_ids
            torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), atol=1e-5, rtol=0)


def test_two_processes_generate_and_update_like_one_engine(tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    # forked: the processes start with this one's imports (spawning re-imports them, many seconds on a busy CPU)
    mp.start_processes(_engine_process, args=(free_port(), path, str(tmp_path / "ep.pt")), nprocs=2,
                       start_method="fork")
    got = torch.load(tmp_path / "ep.pt")
    for k in (0, 2):  # plain decoding, and two MTP drafts a step
        one = LLM(path, speculative_k=k, **SMALL)
        want = [outputs(one, GREEDY), outputs(one, SAMPLED)]
        same(got[k][0], want[0])
        same(got[k][1], want[1])
    weights = new_weights(path)
    before = outputs(one, GREEDY)
    assert one.update_weights(weights) == len(weights)
    same(got["updated"], outputs(one, GREEDY))
    assert got["updated"] != before  # the update changed what the engines write
    per_expert = [n for n in weights if ".experts." in n]
    assert per_expert and got["set"] == len(weights) - len(per_expert) // 2  # rank 0 keeps its 4 of 8 experts
    one.update_weights(new_weights(path, seed=2))
    same(got["adopted"], outputs(one, GREEDY))
    assert got["adopted"] != got["updated"]
    assert got["experts_placed"]  # each layer's stacked 4 experts: one view of a run of the whole buckets


def test_a_group_of_two_workers_is_one_engine(ray_cluster, tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    sampling = Sampling(k=2, temperature=1.0, max_tokens=8, stop=(), seed=5)
    one = LLM(path, **SMALL)
    want = [[c.token_ids for c in o.outputs] for o in one.generate(
        PROMPTS, [dataclasses.replace(SAMPLED, max_tokens=8, seed=sampling.prompt_seed(i), ignore_eos=False,
                                      include_stop_str_in_output=True) for i in range(len(PROMPTS))], use_tqdm=False)]
    group = GenerationGroup.reserve(path, SamplingResources(rollout=Workers(workers=2, cpus=0.5)), with_reward=False,
                                    engine={"ep_size": 2, **SMALL})
    try:
        assert len(group.engines) == 1 and len(group.workers) == 2
        blocking = group.generate(PROMPTS, sampling)
        streamed = {i: c for finished in group.stream(PROMPTS, sampling) for i, c in finished}
        assert len(group.on_each("node_id")) == 1  # one result per engine
    finally:
        group.shutdown()
    assert [[c.token_ids for c in g] for g in blocking] == want
    assert [[c.token_ids for c in streamed[i]] for i in range(len(PROMPTS))] == want


def test_settings_that_rule_expert_parallelism_out_name_the_key(tmp_path):
    v3 = tiny_mtp_model(tmp_path / "v3")  # 8 routed experts
    dense = str(make_tiny_dense(tmp_path / "dense"))
    check = GenerationGroup.check_engines
    assert check(v3, 4, {"ep_size": 2}, "engine", "rl.rollout.engine") == 2
    assert check(dense, 3, {}, "engine") == 1
    cases = [
        (v3, 3, {"ep_size": 2}, "engine", r"rl\.rollout\.engine\.ep_size=2: the 3 workers must be a multiple of it"),
        (v3, 3, {"ep_size": 3}, "engine", r"ep_size=3 does not divide the model's 8 routed experts"),
        (dense, 2, {"ep_size": 2}, "engine", r"rl\.rollout\.engine\.ep_size=2: .* qwen2 model"),
        (v3, 2, {"ep_size": 2}, "vllm", r"ep_size=2 with backend: vllm: .*enable_expert_parallel"),
        (v3, 2, {"ep_size": 2, "cuda_graphs": True}, "engine", r"cuda_graphs: true with rl\.rollout\.engine\.ep_size=2"),
        (v3, 2, {"ep_size": 0}, "engine", r"ep_size must be >= 1"),
    ]
    for model, workers, engine, backend, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(model, workers, engine, backend, "rl.rollout.engine")
    with pytest.raises(ValueError, match=r"engine\.ep_size=2 with backend: vllm"):  # at config time
        Rollout(engine={"ep_size": 2}, backend="vllm")
    with pytest.raises(ValueError, match=r"engine\.cuda_graphs: true with engine\.ep_size=2"):
        RejectionSampleConfig(engine={"ep_size": 2, "cuda_graphs": True})
    with pytest.raises(ConfigError, match="cuda_graphs=True with ep_size=2"):  # and in the engine itself
        LLM(v3, cuda_graphs=True, ep_size=2)
    with pytest.raises(ConfigError, match="ep_size=2: .* this process's group has 1"):
        LLM(v3, ep_size=2)
    with pytest.raises(ConfigError, match="ep_size=2: .* qwen2 model"):
        load_engine_model(dense, torch.float32, torch.device("cpu"), expert_shard=ExpertShard(None, 2, 0))  # type: ignore[arg-type]
