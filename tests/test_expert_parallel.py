"""Expert parallelism (r1pipe.model.expert_parallel, sharding.apply_expert_parallel) on gloo, no Ray.

2 ranks, ep_size 2, the rest FSDP2-sharded: a layer's 8 routed experts live 4 per rank and tokens reach them by
all-to-all. Against one unsharded worker on the whole batch: logits within 1e-5, gradients after a step within
1e-5, the same routing-bias update, and a DCP checkpoint written at ep_size 2 that one worker reads back and
continues exactly. Also the pieces on their own: the expert-major permutation and the ep_size checks."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from r1pipe.causal_lm import run_model
from r1pipe.model.expert_parallel import check_ep_size, expert_major
from r1pipe.workers import PolicyConfig, PolicyWorker
from r1pipe.workers.sharding import expert_parameters, full_tensors
from r1pipe.workers.weight_sync import free_port
from test_grpo_policy import batch_and_inputs, router_biases, tiny_mtp_model

CFG = PolicyConfig(lr=1e-4, micro_batch_size=2, grad_clip=1e9, share_prompts=False)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(worker: PolicyWorker, batch, adv, rows: slice, num_micro: int | None) -> dict:
    return worker.train_step(batch.rows(rows), None, adv[rows], None, float(batch.response_mask.sum()), float(len(batch)),
                             num_micro=num_micro)


def _two_ranks(rank: int, port: int, path: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    batch, adv = batch_and_inputs(rows=4)
    one = PolicyWorker(0, 1, path, CFG)
    ep = PolicyWorker(rank, 2, path, dataclasses.replace(CFG, ep_size=2))
    ep.init_distributed(f"tcp://127.0.0.1:{port}")
    placed = expert_parameters(ep.model)
    assert placed and all(p.to_local().shape[0] == 4 for p in placed)  # 8 experts, 4 on each rank
    mine = slice(0, 2) if rank == 0 else slice(2, 4)

    with torch.no_grad():  # each rank its own rows, experts across both
        want = run_model(one.model, batch.input_ids, batch.attention_mask).logits[mine]
        got = run_model(ep.model, batch.input_ids[mine], batch.attention_mask[mine]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    s1, s2 = train(one, batch, adv, slice(0, 4), None), train(ep, batch, adv, mine, 1)
    assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * s1["grad_norm"], (s1["grad_norm"], s2["grad_norm"])
    assert s1["maxvio"] == pytest.approx(s2["maxvio"], abs=1e-6)
    grads = {n: p.grad for n, p in one.model.named_parameters() if p.grad is not None}
    for name, p in ep.model.named_parameters():
        if name in grads:
            torch.testing.assert_close(full(p.grad), grads[name], atol=1e-5, rtol=0, msg=name)
    biases = router_biases(one.model)  # the same loads, the same nudge
    assert any(float(b.abs().sum()) > 0 for b in biases.values())
    for name, b in router_biases(ep.model).items():
        torch.testing.assert_close(b, biases[name], atol=0, rtol=0, msg=name)

    ep.save_checkpoint(ckpt)
    train(ep, batch, adv, mine, 1)
    after = dict(full_tensors(ep.model))
    if rank == 0:
        torch.save(after, f"{ckpt}.after.pt")
    dist.destroy_process_group()


def test_two_expert_parallel_workers_match_one_worker(tmp_path):
    path, ckpt = tiny_mtp_model(tmp_path / "m"), tmp_path / "ckpt"
    mp.spawn(_two_ranks, args=(free_port(), path, str(ckpt)), nprocs=2)
    resumed = PolicyWorker(0, 1, path, CFG)  # one worker reads the ep_size-2 checkpoint and takes the same step
    resumed.load_checkpoint(str(ckpt))
    batch, adv = batch_and_inputs(rows=4)
    train(resumed, batch, adv, slice(0, 4), None)
    after = torch.load(f"{ckpt}.after.pt")
    for name, t in resumed.model.state_dict().items():
        torch.testing.assert_close(after[name], t, atol=1e-5, rtol=0, msg=name)
    with safe_open(str(ckpt / "model-00001-of-00001.safetensors"), "pt") as f:  # HF layout: every expert by its key
        keys = set(f.keys())
    assert {f"model.layers.1.mlp.experts.{j}.down_proj.weight" for j in range(8)} <= keys


def test_expert_major_orders_arrived_rows_by_local_expert():
    # 2 sources x 2 local experts: rows arrive (s0,e0)=1 (s0,e1)=2 (s1,e0)=2 (s1,e1)=1 -> rows 0 1 2 3 4 5
    counts = torch.tensor([[1, 2], [2, 1]])
    assert expert_major(counts).tolist() == [0, 3, 4, 1, 2, 5]  # e0: s0's row 0, s1's rows 3 4; e1: 1 2, then 5


@pytest.mark.parametrize("ep_size, experts, workers, message", [
    (3, 8, 3, "does not divide the model's 8 routed experts"),
    (4, 8, 2, "the 2 workers must be a multiple of it"),
    (2, 8, 3, "the 3 workers must be a multiple of it"),
    (0, 8, 2, "must be >= 1"),
])
def test_an_ep_size_that_does_not_fit_names_the_numbers(ep_size, experts, workers, message):
    with pytest.raises(ValueError, match=message):
        check_ep_size(ep_size, experts, workers)
    check_ep_size(2, 8, 4)
