"""Weight sync trainer -> engine over a gloo process group (the two ends in two threads of this
process, no Ray at all: ray.put is made to raise), in several buckets, broadcast or through shared
memory, for r1pipe's DeepSeek-V3 and a dense Qwen2 with tied embeddings; the post-sync probe agrees
after a real sync and catches a deliberately corrupted one."""
import dataclasses
import os
import threading

import pytest
import torch

from r1pipe.model.fp8 import FP8_DTYPE, weight_quant
from r1pipe.workers import PolicyConfig, PolicyWorker, RolloutBatch, RolloutWorker, build_batch
from r1pipe.workers import weight_sync
from r1pipe.workers.weight_sync import SyncMismatch, TensorMeta, check_probe, free_port, plan_buckets
from tiny_models import make_tiny_dense


def tiny_model(path, layers: int = 2, mtp_layers: int = 0):
    """A random tiny DeepSeek-V3 (dense first block, MoE after, `mtp_layers` MTP modules) with a 32-token vocabulary."""
    from r1pipe.model import ModelConfig, Transformer, save_pretrained

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=32, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=32, num_hidden_layers=layers, n_routed_experts=8, n_group=2, topk_group=1,
                              num_experts_per_tok=2, num_nextn_predict_layers=mtp_layers, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2, max_position_embeddings=64)
    save_pretrained(Transformer(cfg, seed=0), path)
    return str(path)


def test_buckets_keep_order_split_by_size_and_dtype():
    metas = [TensorMeta("a", (4,), "float32"), TensorMeta("b", (4,), "float32"), TensorMeta("c", (2,), "bfloat16"),
             TensorMeta("d", (10,), "float32"), TensorMeta("e", (1,), "float32")]
    buckets = plan_buckets(metas, bucket_bytes=32)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]
    flat = weight_sync.pack([torch.arange(4.0), torch.arange(4.0, 8.0)])
    views = weight_sync.unpack(flat, buckets[0])
    assert torch.equal(views["b"], torch.arange(4.0, 8.0))


def run_both(*calls):
    """Run the sender and receiver side at once (a broadcast needs both); re-raise any error."""
    errors, results = [], [None] * len(calls)

    def target(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def probe(policy: PolicyWorker, engine: RolloutWorker, tol: float) -> float:
    groups = engine.generate([[3, 4, 5, 6]], 2, 1.0, 8, [0])
    batch = RolloutBatch(problems=[], completions=groups[0])
    train = batch.train_batch(0)
    trainer = policy.logprobs(train)
    return check_probe(trainer, batch.engine_logprobs(tuple(trainer.shape)), train.response_mask, tol)


@pytest.fixture(params=["v3", "qwen2-tied"])
def kind(request):
    return request.param


@pytest.fixture(params=["broadcast", "shared-memory"])
def pair(tmp_path, monkeypatch, request, kind):
    import ray

    def no_object_store(*args, **kwargs):
        raise AssertionError("weight sync must not go through the Ray object store")

    monkeypatch.setattr(ray, "put", no_object_store)
    if kind == "v3":
        model = tiny_model(tmp_path / "model")
    else:  # lm_head.weight and model.embed_tokens.weight are one tensor on both ends
        model = str(make_tiny_dense(tmp_path / "model", "qwen2", tie_word_embeddings=True, vocab_size=32))
    policy = PolicyWorker(0, 1, model, PolicyConfig(lr=5e-2))
    engine = RolloutWorker(model, {"max_model_len": 64})
    buckets = plan_buckets(policy.weight_metas(), bucket_bytes=64 * 1024)
    assert len(buckets) > 3
    port = free_port()
    run_both(lambda: policy.join_sync("127.0.0.1", port, 2, buckets),
             lambda: engine.join_sync("127.0.0.1", port, 1, 2, buckets))
    # train the policy a step, so the engine's weights are stale until the sync
    g = torch.Generator().manual_seed(0)
    batch = build_batch([torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(4)],
                        [torch.randint(3, 32, (6,), generator=g).tolist() for _ in range(4)], pad_id=0)
    old = policy.logprobs(batch)
    policy.train_step(batch, old, torch.tensor([1.0, -1.0, 0.5, -0.5]), None, float(batch.response_mask.sum()), 4.0)
    if request.param == "shared-memory":
        directory = policy.share_buckets()
        engine.attach_shared_buckets(directory)
        policy.unlink_shared(directory)
        assert not os.path.exists(directory)  # mapped, and nothing left on disk
    return policy, engine, buckets


def test_sync_delivers_the_trained_weights_through_the_process_group(pair):
    policy, engine, buckets = pair
    with pytest.raises(SyncMismatch):  # stale engine: the probe sees it
        probe(policy, engine, tol=1e-3)
    _, received = run_both(policy.send_weights, engine.receive_weights)
    assert received == sum(len(b) for b in buckets)
    ours = policy.model.state_dict()
    for name, t in engine.llm.model.state_dict().items():
        assert torch.equal(t, ours[name]), name
    model = engine.llm.model
    if getattr(model.config, "tie_word_embeddings", False):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert probe(policy, engine, tol=1e-3) <= 1e-4


def test_probe_catches_a_corrupted_sync(pair, monkeypatch):
    """The engine ends up with two tensors in each other's places (what a wrong offset in the layout, a wrong dtype
    or a stale shard would do, on either transport; with shared memory the engine reads the trainer's buckets in
    place, so only its mapping can go wrong): the probe sees it."""
    policy, engine, buckets = pair
    real_receive = weight_sync.SyncGroup.receive_flat

    def misplaced(self, weights):
        count = real_receive(self, weights)
        model = engine.llm.model
        a, b = (model.get_submodule(f"model.layers.{i}.self_attn.o_proj").weight for i in (0, 1))
        a.data, b.data = b.data, a.data
        return count

    monkeypatch.setattr(weight_sync.SyncGroup, "receive_flat", misplaced)
    run_both(policy.send_weights, engine.receive_weights)
    with pytest.raises(SyncMismatch, match=r"rl\.sync\.check_tol"):
        probe(policy, engine, tol=1e-3)


def test_engines_on_the_machine_read_the_trainers_weights_in_place(tmp_path):
    """With shared buckets an fp32 engine's weights are the trainer's (same memory): a sync moves no tensor, and the
    next train step is what the engine generates with after the next sync. An engine told to take other weights
    first takes its own copy: the trainer's stay as they were."""
    model = tiny_model(tmp_path / "model")
    policy = PolicyWorker(0, 1, model, PolicyConfig(lr=5e-2))
    engine = RolloutWorker(model, {"max_model_len": 64})
    buckets = plan_buckets(policy.weight_metas(), bucket_bytes=1 << 30)
    port = free_port()
    run_both(lambda: policy.join_sync("127.0.0.1", port, 2, buckets),
             lambda: engine.join_sync("127.0.0.1", port, 1, 2, buckets))
    directory = policy.share_buckets()
    engine.attach_shared_buckets(directory)
    policy.unlink_shared(directory)
    run_both(policy.send_weights, engine.receive_weights)
    name = "model.layers.1.self_attn.q_a_proj.weight"
    ours, theirs = policy.model.get_parameter(name), engine.llm.model.get_parameter(name)
    bucket = engine.sync_group.shared.tensors[0]  # the engine's own mapping of the shared pages
    assert bucket.data_ptr() <= theirs.data_ptr() < bucket.data_ptr() + bucket.numel() * bucket.element_size()
    assert engine.flat_weights.adopted and engine.flat_weights.loose == []
    g = torch.Generator().manual_seed(2)
    batch = build_batch([torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(4)],
                        [torch.randint(3, 32, (6,), generator=g).tolist() for _ in range(4)], pad_id=0)
    trained_from = ours.detach().clone()
    policy.train_step(batch, None, torch.tensor([1.0, -1.0, 0.5, -0.5]), None, float(batch.response_mask.sum()), 4.0)
    assert torch.equal(theirs, ours) and not torch.equal(ours, trained_from)  # the same pages
    run_both(policy.send_weights, engine.receive_weights)
    assert probe(policy, engine, tol=1e-3) <= 1e-4
    before = ours.detach().clone()
    engine.update_weights({name: torch.zeros_like(before)})
    assert torch.equal(ours, before) and not engine.flat_weights.adopted
    assert engine.llm.model.get_parameter(name).abs().sum() == 0


def test_shared_memory_is_declined_without_room(monkeypatch):
    """A tmpfs too small for the tensors (Docker's 64 MB /dev/shm) is not used: writing past its room would kill
    the writer, so the caller falls back to the process group."""
    from r1pipe.workers import shared_memory

    real = os.statvfs(shared_memory.SHARED_MEMORY)
    made = shared_memory.make_directory(1 << 20)
    assert made is not None or real.f_bavail * real.f_frsize < (80 << 20)
    if made is not None:
        shared_memory.unlink(made)
        assert not os.path.exists(made)

    class Small:
        f_bavail, f_frsize = 16, 4 << 20  # 64 MB free

    monkeypatch.setattr(shared_memory.os, "statvfs", lambda path: Small)
    assert shared_memory.make_directory(100 << 20) is None
    assert shared_memory.make_directory(1 << 20) is None  # the margin: 64 MB kept free


@pytest.mark.parametrize("bucket_bytes", [64 * 1024, 1 << 30])
def test_rehome_lays_the_weights_out_as_the_buckets(tmp_path, bucket_bytes):
    """Every state-dict entry reads the same from its bucket run as from the model, the forward is unchanged,
    and with one bucket every tensor (stacked experts too) is a view of it, so writing the bucket writes the model."""
    from r1pipe.model import load_pretrained

    model = load_pretrained(tiny_model(tmp_path / "model"))
    ids = torch.randint(3, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    state_before = {n: t.clone() for n, t in model.state_dict().items()}
    buckets = plan_buckets([weight_sync.tensor_meta(n, t) for n, t in model.state_dict().items()], bucket_bytes)
    flat = weight_sync.rehome(model, buckets)
    assert torch.equal(model(ids).logits, before)
    for flat_i, bucket in zip(flat.flats, buckets):
        for name, view in weight_sync.unpack(flat_i, bucket).items():
            assert torch.equal(view, state_before[name]), name
    assert flat.num_names == len(state_before) and flat.fits(buckets)
    if len(buckets) == 1:
        assert flat.loose == []
        experts = model.get_submodule("model.layers.1.mlp.experts")
        start, nbytes = flat.flats[0].data_ptr(), flat.flats[0].numel() * 4
        bias = model.get_submodule("model.layers.1.mlp.gate").e_score_correction_bias  # a buffer in the state dict
        assert all(start <= t.data_ptr() < start + nbytes for t in [*model.parameters(), bias])
        flat.flats[0].zero_()
        assert experts.gate_proj.abs().sum() == 0 and model.lm_head.weight.abs().sum() == 0
    else:
        assert flat.loose  # a stack whose experts straddle two buckets is copied entry by entry
    first = next(model.parameters())
    first.data = first.data.clone()  # something replaced a parameter's storage: the layout no longer serves
    assert not flat.fits(buckets)


def test_a_rehomed_trainer_steps_as_before(tmp_path):
    """The trainer's weights moved into the sync buckets (as a whole model's first sync does) train exactly as
    they did in place: same loss, same weights after two steps."""
    model = tiny_model(tmp_path / "model")
    workers = [PolicyWorker(0, 1, model, PolicyConfig(lr=5e-2)) for _ in range(2)]
    buckets = plan_buckets(workers[0].weight_metas(), bucket_bytes=64 * 1024)
    workers[1]._flat_weights(buckets)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = build_batch([torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(4)],
                            [torch.randint(3, 32, (6,), generator=g).tolist() for _ in range(4)], pad_id=0)
        adv, n = torch.tensor([1.0, -1.0, 0.5, -0.5]), float(batch.response_mask.sum())
        stats = [w.train_step(batch, None, adv, None, n, 4.0) for w in workers]
        assert stats[0]["loss"] == stats[1]["loss"]
    assert workers[1].flat_weights.fits(buckets)
    ours, theirs = workers[0].model.state_dict(), workers[1].model.state_dict()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def moved_and_synced(tmp_path, engine_kwargs: dict) -> tuple[PolicyWorker, RolloutWorker]:
    """A policy and an engine of the tiny model joined in a sync group; the policy's weights moved by 0.01, then
    synced once in 64 KB buckets."""
    model = tiny_model(tmp_path / "model")
    policy = PolicyWorker(0, 1, model, PolicyConfig(lr=5e-2))
    engine = RolloutWorker(model, engine_kwargs)
    buckets = plan_buckets(policy.weight_metas(), bucket_bytes=64 * 1024)
    port = free_port()
    run_both(lambda: policy.join_sync("127.0.0.1", port, 2, buckets),
             lambda: engine.join_sync("127.0.0.1", port, 1, 2, buckets))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01)
    run_both(policy.send_weights, engine.receive_weights)
    return policy, engine


def test_sync_into_a_bfloat16_engine(tmp_path):
    """An engine in another dtype than the buckets takes its bf16 tensors loose, cast on the copy (the router's fp32
    bias still lands in place)."""
    policy, engine = moved_and_synced(tmp_path, {"max_model_len": 64, "dtype": "bfloat16"})
    assert all(t.dtype == torch.float32 for t, _ in engine.flat_weights.placed)
    ours, dtypes = policy.model.state_dict(), set()
    for name, t in engine.llm.model.state_dict().items():
        assert torch.equal(t, ours[name].to(t.dtype)), name
        dtypes.add(t.dtype)
    assert torch.bfloat16 in dtypes


def test_sync_into_an_fp8_engine_quantizes_on_the_way_in(tmp_path):
    """An FP8 engine (rl.rollout.engine.fp8) takes its projections loose from the trainer's buckets and quantizes each
    into its held FP8 weight and block scales: exactly weight_quant of the trainer's weight; the rest as is."""
    policy, engine = moved_and_synced(tmp_path, {"max_model_len": 64, "fp8": True})
    ours, engine_state, quantized = policy.model.state_dict(), engine.llm.model.state_dict(), 0
    for name, t in engine_state.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == FP8_DTYPE:
            q, s = weight_quant(ours[name])
            assert torch.equal(t.view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(engine_state[name + "_scale_inv"], s), name
            quantized += 1
        else:
            assert torch.equal(t, ours[name]), name
    assert quantized >= 8 + 3 * 8  # attention and MLP projections, every expert's three
