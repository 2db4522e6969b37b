"""RolloutWorker(backend="vllm") against the fake `vllm` package (tests/fake_vllm): what it asks vLLM to sample,
the Completions it builds, the start-up contract check, and weight syncs from a trainer reaching vLLM's
load_weights with the trainer's names, shapes and values: in process over a real SyncGroup (broadcast and
shared memory), and under Ray (-m slow) from a PolicyGroup; ScoredSampler's workers on vLLM under Ray."""
from __future__ import annotations

import json
import sys

import pytest
import ray
import torch
from safetensors.torch import load_file
from test_grpo_weight_sync import run_both, tiny_model

from conftest import FAKE_VLLM
from r1pipe.config import load_recipe, stage_config
from r1pipe.data.rows import PromptRow
from r1pipe.errors import EXIT_USER_ERROR, explain
from r1pipe.stages import StageContext
from r1pipe.stages.grpo import GRPOTrainer
from r1pipe.stages.scored_sampling import Sampling, ScoredSampler
from r1pipe.stages.sections import SamplingResources, Workers
from r1pipe.workers import PolicyConfig, PolicyWorker, RolloutWorker, build_batch
from r1pipe.workers.group import PolicyGroup
from r1pipe.workers.weight_sync import free_port, plan_buckets

ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 64}  # what GRPO's rollout workers get


def digest(t: torch.Tensor) -> str:
    from vllm import tensor_digest  # the fake's, imported once the fixture has put it on the path

    return tensor_digest(t)


def worker_record(path) -> list[dict]:
    """The fake vllm's calls in Ray workers, from the file FAKE_VLLM_RECORD names."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def loaded(record: list[dict]) -> list[list]:
    """[name, shape, dtype, digest] of every tensor the fake's load_weights took, in order."""
    return [w for e in record if e["event"] == "load_weights" for w in e["weights"]]


def test_samples_with_the_rollout_settings_and_builds_completions(fake_vllm, tmp_path):
    model = tiny_model(tmp_path / "model")
    worker = RolloutWorker(model, ENGINE, seed=5, backend="vllm")
    made = [e for e in fake_vllm.RECORD if e["event"] == "LLM"]
    assert len(made) == 1 and made[0]["seed"] == 5 and made[0]["dtype"] == "float32"
    assert made[0]["kwargs"]["logprobs_mode"] == "processed_logprobs" and made[0]["kwargs"]["max_model_len"] == 64
    assert len([e for e in fake_vllm.RECORD if e["event"] == "add_request"]) == 2  # the contract probe ran
    fake_vllm.RECORD.clear()

    prompts = [[3, 4, 5], [6, 7]]
    groups = worker.generate(prompts, n=3, temperature=0.7, max_tokens=6, seeds=[11, 12], stop=["c"])
    asked = [e["params"] for e in fake_vllm.RECORD if e["event"] == "add_request"]
    assert [(p["n"], p["temperature"], p["max_tokens"], p["stop"], p["seed"], p["logprobs"], p["top_k"], p["top_p"])
            for p in asked] == [(3, 0.7, 6, ["c"], 11, 0, -1, 1.0), (3, 0.7, 6, ["c"], 12, 0, -1, 1.0)]
    llm = worker.llm._llm
    reasons = set()
    for prompt, group in zip(prompts, groups):
        assert len(group) == 3
        for c in group:
            ids, ref = list(prompt), []
            for tok in c.token_ids:
                ref.append(float(torch.log_softmax(llm.logits(ids) / 0.7, -1)[tok]))
                ids.append(tok)
            assert c.prompt_ids == prompt and 1 <= len(c.token_ids) <= 6
            assert c.logprobs == pytest.approx(ref, abs=1e-6)
            text = llm.tokenizer.decode(c.token_ids)
            if c.finish_reason == "stop" and "c" in text:  # the stop string is kept for the rewards
                assert c.text == text[:text.index("c") + 1]
            else:
                assert c.text == text
            reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # both endings occur in this draw

    streamed = {i: group for step in worker.generate_stream(prompts, 3, 0.7, 6, [11, 12], ["c"]) for i, group in step}
    assert sorted(streamed) == [0, 1]
    assert all([c.token_ids for c in streamed[i]] == [c.token_ids for c in groups[i]] for i in (0, 1))
    with pytest.raises(NotImplementedError, match="routing"):
        worker.generate(prompts, 1, 1.0, 4, return_routing=True)
    assert worker.pad_token_id() == 0  # the checkpoint's pad id, through vLLM's tokenizer
    with pytest.raises(NotImplementedError, match="own engine"):
        worker.take_draft_stats()


def test_a_contract_violation_stops_the_worker_at_start_up(fake_vllm, monkeypatch, tmp_path):
    from r1pipe.engine.vllm_backend import LogprobContractError

    monkeypatch.setenv("FAKE_VLLM_LOGPROBS", "raw")
    with pytest.raises(LogprobContractError, match="temperature is not applied before the softmax") as info:
        RolloutWorker(tiny_model(tmp_path / "model"), ENGINE, backend="vllm")
    told = explain(info.value, "r1pipe")  # what `r1pipe run` prints: one line naming the cause, a user error
    assert told.status == EXIT_USER_ERROR and len(told.lines) == 1 and "log_softmax(logits / T)" in told.lines[0]


def test_backend_choice_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown engine backend 'sglang'; expected one of engine, vllm"):
        RolloutWorker(str(tmp_path), ENGINE, backend="sglang")
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as where it is not installed
    with pytest.raises(ImportError, match=r"needs vllm and a CUDA GPU: pip install 'r1pipe\[vllm\]'"):
        RolloutWorker(str(tmp_path), ENGINE, backend="vllm")


def test_vllm_rollouts_switch_tis_on(tmp_path):
    """GRPO with rl.rollout.backend: vllm corrects the trainer/engine mismatch (vLLM's kernels are not the
    trainer's) with TIS by default, and checks syncs at TIS's tolerance, also over a float32 engine and model."""
    def trainer(overrides: list[str]) -> GRPOTrainer:
        recipe = load_recipe("r1-zero-tiny", ["model.dtype=float32", *overrides])
        return GRPOTrainer(stage_config(recipe, "rl"), StageContext(run_dir=tmp_path, stage_dir=tmp_path, recipe=recipe, seed=0))

    assert (trainer([]).tis, trainer([]).sync_check_tol) == (False, 1e-3)
    assert (trainer(["rl.rollout.backend=vllm"]).tis, trainer(["rl.rollout.backend=vllm"]).sync_check_tol) == (True, 0.1)


def moved(policy: PolicyWorker, by: float) -> None:
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(by)


@pytest.mark.parametrize("transport", ["broadcast", "shared-memory"])
def test_a_sync_reaches_vllms_loader_with_the_trainers_weights(fake_vllm, tmp_path, transport):
    """Every synced name arrives once, in the trainer's order, with its shape and exact values, bucket by
    bucket, twice (the receive buffers are reused); the trainer's weights are untouched by the engine."""
    model = tiny_model(tmp_path / "model")
    policy = PolicyWorker(0, 1, model, PolicyConfig(lr=5e-2))
    engine = RolloutWorker(model, ENGINE, backend="vllm")
    buckets = plan_buckets(policy.weight_metas(), bucket_bytes=64 * 1024)
    assert len(buckets) > 3
    port = free_port()
    run_both(lambda: policy.join_sync("127.0.0.1", port, 2, buckets),
             lambda: engine.join_sync("127.0.0.1", port, 1, 2, buckets))
    if transport == "shared-memory":
        directory = policy.share_buckets()
        engine.attach_shared_buckets(directory)
        policy.unlink_shared(directory)
    names = [m.name for m in policy.weight_metas()]
    for by in (0.01, -0.03):
        fake_vllm.RECORD.clear()
        moved(policy, by)
        _, count = run_both(policy.send_weights, engine.receive_weights)
        assert count == len(names)
        ours = policy.model.state_dict()
        assert loaded(fake_vllm.RECORD) == [[n, list(ours[n].shape), "float32", digest(ours[n])] for n in names]
        assert sum(e["event"] == "load_weights" for e in fake_vllm.RECORD) == len(buckets)  # one call per bucket
    held = engine.llm._llm.worker.model_runner.model.weights
    assert all(torch.equal(held[n], ours[n]) for n in names)
    before = {n: t.clone() for n, t in ours.items()}
    engine.update_weights({names[0]: torch.zeros_like(ours[names[0]])})
    assert held[names[0]].abs().sum() == 0
    assert all(torch.equal(policy.model.state_dict()[n], before[n]) for n in names)


@pytest.fixture(scope="module")
def ray_with_fake_vllm(tmp_path_factory):
    """Ray whose workers import the fake vllm (PYTHONPATH) and record its calls to a file (read it with
    `worker_record`)."""
    path = tmp_path_factory.mktemp("ray_vllm") / "vllm_calls.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(FAKE_VLLM), "FAKE_VLLM_RECORD": str(path)}})
    yield path
    ray.shutdown()


@pytest.mark.slow  # about 30 s on 2 shared cores: Ray with a runtime env, a trainer and an engine actor
def test_policy_group_syncs_into_a_vllm_rollout_worker_under_ray(fake_vllm, ray_with_fake_vllm, tmp_path):
    """A trained step of a 1-worker PolicyGroup reaches a RolloutWorker(backend="vllm") actor through
    connect_engines / sync_weights (shared memory on this machine): every name once, with the trainer's values."""
    model = tiny_model(tmp_path / "model")
    ray_with_fake_vllm.write_text("")
    group = PolicyGroup(1, model, PolicyConfig(lr=5e-2, device="cpu"))
    engine = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(model, ENGINE, 0, 1, backend="vllm")
    assert ray.get(engine.pad_token_id.remote()) == 0
    group.connect_engines([engine], bucket_mb=0.0625)
    g = torch.Generator().manual_seed(0)
    batch = build_batch([torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(4)],
                        [torch.randint(3, 32, (6,), generator=g).tolist() for _ in range(4)], pad_id=0)
    group.train_step(batch, None, torch.tensor([1.0, -1.0, 0.5, -0.5]), None, float(batch.response_mask.sum()), 4.0)
    group.sync_weights()
    group.save_checkpoint(str(tmp_path / "trained"), None)
    trained = {}
    for f in sorted((tmp_path / "trained").glob("*.safetensors")):
        trained.update(load_file(str(f)))
    got = loaded(worker_record(ray_with_fake_vllm))
    assert sorted(n for n, *_ in got) == sorted(trained) and len(got) == len(trained)
    assert all(shape == list(trained[n].shape) and d == digest(trained[n]) for n, shape, _, d in got)
    original = dict(load_file(str(next((tmp_path / "model").glob("*.safetensors")))))
    assert any(not torch.equal(original[n], trained[n]) for n in trained)  # the step moved the weights
    group.shutdown()
    ray.kill(engine)


@pytest.mark.slow  # about 20 s: a rollout worker and a reward worker under Ray
def test_scored_sampler_streams_from_vllm_rollout_workers(fake_vllm, ray_with_fake_vllm, tmp_path):
    """ScoredSampler(backend="vllm") (rejection sampling's sampler) builds its rollout workers on vLLM and streams
    back, per prompt, the k completions vLLM draws for the prompt's seed, with the stop string kept."""
    model = tiny_model(tmp_path / "model")
    rows = [PromptRow(str(i), "q", "p", [3 + i, 4, 5], {"answer": "1"}) for i in range(3)]
    sampling = Sampling(k=2, temperature=1.0, max_tokens=5, stop=("c",), seed=3)
    ray_with_fake_vllm.write_text("")
    sampler = ScoredSampler(model, sampling, {"accuracy": 1.0}, resources=SamplingResources(rollout=Workers(cpus=0.5)),
                            backend="vllm")
    try:
        chunks = list(sampler.run(rows, 2))
    finally:
        sampler.shutdown()
    assert [e["model"] for e in worker_record(ray_with_fake_vllm) if e["event"] == "LLM"] == [model]
    here = fake_vllm.LLM(model)
    for chunk in chunks:
        for i, (row, samples) in enumerate(zip(chunk.rows, chunk.samples)):
            p = fake_vllm.SamplingParams(n=2, temperature=1.0, max_tokens=5, stop=["c"], seed=sampling.prompt_seed(chunk.start + i))
            drawn = [here.complete(row.prompt_ids, p, j) for j in range(2)]
            assert [(s.text, s.num_tokens, s.finish_reason) for s in samples] == \
                   [(c.text + (c.stop_reason or ""), len(c.token_ids), c.finish_reason) for c in drawn]
    assert [c.start for c in chunks] == [0, 2]
