"""The MTP draft loss under FSDP2 (2 policy workers in-process on gloo, no Ray): it reaches only the MTP
module's own parameters, so it joins the GRPO loss's backward on sharded parameters. 2 sharded workers with
the draft loss step like 1 worker on the whole batch (one of them idle in the second micro-batch), and
with or without the draft loss the embedding and head get the same gradients. Under bf16 (FSDP gathering and
reducing in bf16), with activation checkpointing and fsdp_keep_gathered, or FP8 projections, they agree with
1 worker to bf16 rounding."""
import dataclasses

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1pipe.config import make_config
from r1pipe.model import Precision
from r1pipe.stages.configs import GRPOConfig
from r1pipe.workers import PolicyConfig, PolicyWorker
from r1pipe.workers.sharding import full_tensors, shard
from r1pipe.workers.weight_sync import free_port
from test_grpo_policy import batch_and_inputs, tiny_mtp_model

# lr 1e-4: see test_grpo_fsdp (AdamW turns rounding-sized gradients into steps of up to lr)
CFG = PolicyConfig(lr=1e-4, draft_loss=True, draft_lr_scale=10.0, draft_depth=2, micro_batch_size=2)


def step(worker: PolicyWorker, batch, advantages, rows: slice, num_micro: int | None) -> dict:
    """One train_step on `rows` of the batch, normalised by the whole batch's counts."""
    return worker.train_step(batch.rows(rows), None, advantages[rows], None, float(batch.response_mask.sum()),
                             float(len(batch)), num_draft_positions=float(batch.response_mask[:, 1:].sum()),
                             num_micro=num_micro)


def sharded_worker(rank: int, path: str, cfg: PolicyConfig) -> PolicyWorker:
    """Rank `rank` of 2 in the process group that exists already (what init_distributed does after joining)."""
    worker = PolicyWorker(rank, 2, path, cfg)
    shard(worker.model, cfg.fsdp_keep_gathered)
    worker._build_optimizer()
    return worker


def _two_ranks(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    batch, adv = batch_and_inputs(rows=3)
    one = PolicyWorker(0, 1, path, CFG)
    two = sharded_worker(rank, path, CFG)
    plain = sharded_worker(rank, path, dataclasses.replace(CFG, draft_loss=False, share_prompts=False))
    mine = slice(0, 2) if rank == 0 else slice(2, 3)  # 2 micro-batches: rank 1 is idle in its second
    for seed in range(2):
        s1, s2 = step(one, batch, adv, slice(0, 3), None), step(two, batch, adv, mine, 2)
        drafted = torch.tensor(s2["draft_loss"])
        dist.all_reduce(drafted)
        assert abs(float(drafted) - s1["draft_loss"]) <= 1e-5 * s1["draft_loss"], (float(drafted), s1["draft_loss"])
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1.0, s1["grad_norm"])
        if seed == 0:  # the draft loss adds nothing to the embedding's and head's gradients
            step(plain, batch, adv, mine, 2)
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                got, want = two.model.get_parameter(name).grad, plain.model.get_parameter(name).grad
                assert torch.equal(got.to_local(), want.to_local()), name
            own = {id(p) for p in two.draft_params}
            assert all(p.grad is None for p in plain.model.parameters() if id(p) in own)  # no drafter: no gradient
            assert all(float(p.grad.to_local().abs().sum()) > 0 for p in two.draft_params if p.to_local().numel())
    want = dict(one.model.state_dict())
    for name, t in full_tensors(two.model):
        torch.testing.assert_close(t, want[name], atol=1e-5, rtol=0, msg=name)
    _in_bf16(rank, path, batch, adv, mine)
    dist.destroy_process_group()


def _in_bf16(rank: int, path: str, batch, adv, mine: slice) -> None:
    """bf16 compute: 2 sharded workers against 1, within 2e-2 (grad norm, draft loss) and 5e-2 (log-probs)."""
    bf16 = dataclasses.replace(CFG, activation_checkpointing=True, precision=Precision(dtype=torch.bfloat16))
    for cfg in (dataclasses.replace(bf16, fsdp_keep_gathered=True),
                dataclasses.replace(bf16, precision=Precision(dtype=torch.bfloat16, fp8=True))):
        one, two = PolicyWorker(0, 1, path, cfg), sharded_worker(rank, path, cfg)
        for _ in range(2):
            s1, s2 = step(one, batch, adv, slice(0, 3), None), step(two, batch, adv, mine, 2)
            drafted = torch.tensor(s2["draft_loss"])
            dist.all_reduce(drafted)
            assert abs(float(drafted) - s1["draft_loss"]) <= 2e-2 * s1["draft_loss"], (float(drafted), s1["draft_loss"])
            assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 2e-2 * s1["grad_norm"], (s1["grad_norm"], s2["grad_norm"])
        gap = (one.logprobs(batch) - two.logprobs(batch, num_micro=1)).abs().max()
        assert gap <= 5e-2, (cfg, gap)


def test_two_sharded_workers_with_the_draft_loss_step_like_one(tmp_path):
    mp.spawn(_two_ranks, args=(free_port(), tiny_mtp_model(tmp_path / "m")), nprocs=2)


def test_the_draft_loss_with_sharded_workers_is_a_valid_grpo_config():
    sharded = {"parallelism.fsdp": True, "resources.trainer.workers": 2}
    assert make_config(GRPOConfig, {**sharded, "algorithm.draft_loss": True}).algorithm.draft_loss
    make_config(GRPOConfig, {**sharded, "rollout.engine": {"speculative_k": 2}})  # the draft loss on by default
