"""FSDP2 policy workers on Ray (gloo, CPU): 2 sharded workers step like 1 on the same batch, each
holds about half the parameter and optimizer bytes, a checkpoint written by 2 workers resumes on 1
and continues identically, and the exported model is a Hugging Face checkpoint transformers loads;
with fsdp_keep_gathered they still step like 1 and gather each unit once per step; the whole model is
gathered exactly (two processes, no Ray). In every layout the workers know a checkpoint's size before
writing it, one that fills the disk is removed, and fresh workers loading one get back exactly the
optimizer state written."""
import dataclasses
import math
import re

import pytest
import torch

ray = pytest.importorskip("ray")

from r1pipe.tracking.checkpoints import DiskFullError, tree_bytes, write_checkpoint  # noqa: E402
from r1pipe.workers import PolicyConfig, build_batch  # noqa: E402
from r1pipe.workers.group import PolicyGroup  # noqa: E402
from test_grpo_weight_sync import tiny_model as weight_sync_tiny_model  # noqa: E402


def tiny_model(path):
    return weight_sync_tiny_model(path, layers=3)


def batch_and_advantages(seed: int, rows: int = 5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 32, (4 + i % 3,), generator=g).tolist() for i in range(rows)]
    completions = [torch.randint(3, 32, (6 + i % 2,), generator=g).tolist() for i in range(rows)]
    return build_batch(prompts, completions, pad_id=0), torch.randn(rows, generator=g)


def grpo_step(group: PolicyGroup, seed: int) -> dict:
    batch, adv = batch_and_advantages(seed)
    old = group.logprobs(batch)
    ref = group.logprobs(batch, reference=True)
    return group.train_step(batch, old, adv, ref, float(batch.response_mask.sum()), float(len(batch)))


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# A small learning rate: summation order differs between 1 and 2 ranks (fp32 rounding of gradients ~1e-9),
# and AdamW turns a coordinate whose gradient is itself ~eps into a step of up to lr; at 1e-4 that stays
# far under the 1e-5 the comparison allows, while a real error (e.g. averaged instead of summed
# gradients, which halves grad_norm) does not.
CFG = PolicyConfig(lr=1e-4, kl_coef=0.1, micro_batch_size=2, clip_low=0.2, clip_high=0.28)
PROBE, _ = batch_and_advantages(seed=9)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("fsdp") / "model")


@dataclasses.dataclass
class OneWorker:
    """What one policy worker does on `model` with CFG: the stats of its GRPO steps on seeds 0, 1, 2, 3, the
    log-probs of PROBE after 2 and after 4 of them, and the bytes it holds after 2 (optimizer state made)."""

    steps: list[dict]
    probe: dict[int, torch.Tensor]
    memory: dict


@pytest.fixture(scope="module")
def one_worker(ray_cluster, model) -> OneWorker:
    """The layouts' reference, run once for the module (one worker neither shards nor shares: fsdp and
    shared_memory do not change it)."""
    one = PolicyGroup(1, model, CFG, frozen_path=model)
    steps, probe = [], {}
    for seed in range(4):
        steps.append(grpo_step(one, seed))
        if seed == 1:
            probe[2], memory = one.logprobs(PROBE), one.memory()[0]
    probe[4] = one.logprobs(PROBE)
    one.shutdown()
    return OneWorker(steps, probe, memory)


def test_two_sharded_workers_step_like_one_and_hold_half_the_bytes(model, one_worker, tmp_path):
    two = PolicyGroup(2, model, CFG, frozen_path=model)
    for seed in (0, 1):
        s1, s2 = one_worker.steps[seed], grpo_step(two, seed)
        assert s1["tokens"] == s2["tokens"]
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1.0, s1["grad_norm"])
        assert abs(s1["kl"] - s2["kl"]) <= 1e-5
    assert (one_worker.probe[2] - two.logprobs(PROBE)).abs().max() <= 1e-5  # same weights after two updates

    whole, halves = one_worker.memory, two.memory()
    print(f"\nbytes held: 1 worker {whole}; 2 FSDP workers {halves}")
    for kind in ("parameters", "optimizer"):
        # the shards cover the whole (FSDP pads dim 0 of a parameter to a multiple of the rank count)
        assert whole[kind] <= sum(h[kind] for h in halves) <= 1.02 * whole[kind]
        for h in halves:
            assert 0.4 <= h[kind] / whole[kind] <= 0.6, (kind, h[kind], whole[kind])

    # a checkpoint of the 2 sharded workers resumes on 1 worker and continues like the 2
    ckpt = tmp_path / "ckpt"
    two.save_checkpoint(str(ckpt), tokenizer_dir=None)
    resumed = PolicyGroup(1, model, CFG, frozen_path=model)
    resumed.load_checkpoint(str(ckpt))
    a, b = grpo_step(two, 2), grpo_step(resumed, 2)
    assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"])
    assert (two.logprobs(PROBE) - resumed.logprobs(PROBE)).abs().max() <= 1e-5
    for g in (two, resumed):
        g.shutdown()

    # the exported checkpoint is the whole model in the Hugging Face layout
    transformers = pytest.importorskip("transformers")
    from r1pipe.model import load_pretrained

    ours = load_pretrained(ckpt).eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (ours(PROBE.input_ids).logits - hf(PROBE.input_ids).logits).abs().max() <= 1e-4


def test_activation_checkpointing_gives_the_same_update(ray_cluster, model):
    plain = PolicyGroup(2, model, CFG, frozen_path=model)
    recompute = PolicyGroup(2, model, dataclasses.replace(CFG, activation_checkpointing=True), frozen_path=model)
    a, b = grpo_step(plain, 0), grpo_step(recompute, 0)
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * max(1.0, a["grad_norm"])
    assert (plain.logprobs(PROBE) - recompute.logprobs(PROBE)).abs().max() <= 1e-6
    plain.shutdown()
    recompute.shutdown()


def test_sharded_workers_that_keep_parameters_gathered_step_like_one(model, one_worker):
    kept = PolicyGroup(2, model, dataclasses.replace(CFG, fsdp_keep_gathered=True), frozen_path=model)
    for seed in (0, 1):
        s1, s2 = one_worker.steps[seed], grpo_step(kept, seed)
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1.0, s1["grad_norm"])
    assert (one_worker.probe[2] - kept.logprobs(PROBE)).abs().max() <= 1e-5
    kept.shutdown()


def _gather_on_two_ranks(rank: int, port: int, model_path: str) -> None:
    """Rank `rank` of 2 (gloo): full_tensors of a sharded V3 with MTP (embedding and head shared, an odd vocab:
    uneven shards) equals the unsharded state dict, names and order included; gather_full also handles a rank
    whose shard is empty; keep_gathered gathers each unit once per step instead of per micro-batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import profile

    from r1pipe.model import load_pretrained
    from r1pipe.workers.policy import PolicyWorker
    from r1pipe.workers.sharding import full_tensors, gather_full, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    whole = load_pretrained(model_path)
    want = {n: t.clone() for n, t in whole.state_dict().items()}
    got = list(full_tensors(shard(whole)))
    assert [n for n, _ in got] == list(want)
    for name, t in got:
        assert torch.equal(t, want[name]), name

    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))  # rows 2 + 1 and 1 + 0
    expected = {n: t.clone() for n, t in small.state_dict().items()}
    for layer in small:
        fully_shard(layer)
    fully_shard(small)
    assert {n: t.shape for n, t in gather_full(small).items()} == {n: t.shape for n, t in expected.items()}
    assert all(torch.equal(gather_full(small)[n], t) for n, t in expected.items())

    batch, adv = batch_and_advantages(seed=rank, rows=6)  # 3 micro-batches of 2 rows on each rank
    gathers = {}
    for keep in (False, True):
        worker = PolicyWorker(rank, 2, model_path, dataclasses.replace(CFG, fsdp_keep_gathered=keep, kl_coef=0.0))
        shard(worker.model, keep)  # what init_distributed does once the process group exists
        worker._build_optimizer()
        with profile() as prof:
            worker.train_step(batch, None, adv, None, 40.0, 12.0, num_micro=3)
        gathers[keep] = sum(e.count for e in prof.key_averages() if "allgather" in e.key.lower())
    units = 1 + len(whole.blocks)
    assert gathers[True] <= units < gathers[False], gathers
    dist.destroy_process_group()


def test_sharded_parameters_gather_in_one_collective_and_keep_gathered_gathers_once(tmp_path):
    import torch.multiprocessing as mp

    from r1pipe.model import ModelConfig, Transformer, save_pretrained
    from r1pipe.workers.weight_sync import free_port

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=33, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8, n_group=2,
                              topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=1, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2, max_position_embeddings=64)
    save_pretrained(Transformer(cfg, seed=0), tmp_path / "model")
    mp.spawn(_gather_on_two_ranks, args=(free_port(), str(tmp_path / "model")), nprocs=2)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_two_replicas_step_like_one_summing_in_shared_memory_or_over_gloo(model, one_worker, tmp_path, shared_memory):
    """Replicas (fsdp=False) keep their gradients in one flat buffer each: on this machine's CPUs it is a slot of
    a shared-memory region summed in place, else the group all-reduces it; a checkpoint load that replaces the
    gradients is put back into the buffer."""
    cfg = dataclasses.replace(CFG, fsdp=False, shared_memory=shared_memory)
    two = PolicyGroup(2, model, cfg, frozen_path=model)
    assert ray.get([w.__ray_call__.remote(lambda w: w.shared_grads is not None) for w in two.workers]) == [shared_memory] * 2
    for seed in (0, 1):
        s1, s2 = one_worker.steps[seed], grpo_step(two, seed)
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1.0, s1["grad_norm"])
    two.save_checkpoint(str(tmp_path / "ckpt"), None)
    two.load_checkpoint(str(tmp_path / "ckpt"))  # sets fresh gradient tensors
    for seed in (2, 3):
        s1, s2 = one_worker.steps[seed], grpo_step(two, seed)
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1.0, s1["grad_norm"])
    assert (one_worker.probe[4] - two.logprobs(PROBE)).abs().max() <= 1e-5
    two.shutdown()


@pytest.mark.parametrize("workers,fsdp", [(1, True), (2, False), (2, True)], ids=["one", "replicas", "sharded"])
def test_a_checkpoint_is_sized_before_it_is_written_and_resumes_exactly(ray_cluster, tmp_path, small_disk, workers, fsdp):
    """In each layout:
    - new workers loading a checkpoint continue exactly as the ones that wrote it. The GRPO loss never reaches
      the MTP module, so without the draft loss one worker (or FSDP) leaves it unstepped, with no AdamW state,
      while replicas step every parameter: each layout gets back the state it wrote, no more and no less;
    - the workers' own estimate of the checkpoint's size is an upper bound within 35% (a parameter never
      stepped, e.g. that MTP module, is counted with AdamW state it does not have);
    - a disk that fills while the workers write (inside their Ray actors) ends in DiskFullError, the partial
      checkpoint removed, and the workers go on (the resume below); with the estimate given, the write is
      refused before it starts."""
    model = weight_sync_tiny_model(tmp_path / "model", layers=2, mtp_layers=1)
    cfg = dataclasses.replace(CFG, fsdp=fsdp, lr=1e-2)
    writer = PolicyGroup(workers, model, cfg, frozen_path=model)
    for seed in (0, 1):
        grpo_step(writer, seed)
    estimate = writer.checkpoint_bytes()
    ckpt = write_checkpoint(tmp_path / "checkpoints", 2, lambda d: writer.save_checkpoint(str(d), None), {})
    assert tree_bytes(ckpt) <= estimate <= 1.35 * tree_bytes(ckpt), (estimate, tree_bytes(ckpt))

    root = small_disk(tree_bytes(ckpt) // 2**20 - 1) / "checkpoints"  # a megabyte or more too small
    with pytest.raises(DiskFullError, match=rf"^no space left on {re.escape(str(root))}: need \d+ MB"):
        write_checkpoint(root, 2, lambda d: writer.save_checkpoint(str(d), None), {}, need_bytes=0)  # size unknown
    assert list(root.iterdir()) == []
    with pytest.raises(DiskFullError, match=rf"need {math.ceil(estimate / 2**20)} MB"):  # known: refused at once
        write_checkpoint(root, 2, lambda d: writer.save_checkpoint(str(d), None), {}, need_bytes=estimate)
    tiny = small_disk(1) / "checkpoints"  # not even the whole model fits: rank 0 fails alone, no rank waits for it
    with pytest.raises(DiskFullError):
        write_checkpoint(tiny, 2, lambda d: writer.save_checkpoint(str(d), None), {})
    assert list(tiny.iterdir()) == []

    reader = PolicyGroup(workers, model, cfg, frozen_path=model)
    reader.load_checkpoint(str(ckpt))
    assert reader.memory() == writer.memory()  # the same optimizer state, byte for byte
    for seed in (2, 3):
        a, b = grpo_step(writer, seed), grpo_step(reader, seed)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), seed
    torch.testing.assert_close(reader.logprobs(PROBE), writer.logprobs(PROBE), atol=1e-6, rtol=0)
    writer.shutdown(), reader.shutdown()


def test_shards_split_the_rows_by_tokens():
    """Contiguous shards whose token counts are as equal as whole rows allow (hand-checked)."""
    from r1pipe.workers.group import balanced_shards

    def sizes(tokens, parts):
        return [(s.start, s.stop) for s in balanced_shards(torch.tensor(tokens), parts)]

    assert sizes([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert sizes([30, 10, 10, 10], 2) == [(0, 1), (1, 4)]  # by rows it would be 40 against 20
    assert sizes([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]
    assert sizes([5, 5, 5, 5, 5, 5], 3) == [(0, 2), (2, 4), (4, 6)]
    assert sizes([7], 2) == [(0, 1), (1, 1)]  # a rank may get no rows
    assert sizes([], 2) == [(0, 0), (0, 0)]
    assert sizes([4, 4, 4], 1) == [(0, 3)]
