"""FSDP2 under a bf16 recipe (r1pipe.workers.sharding.precision_policy), 2 gloo ranks on CPU, no Ray: r1pipe's
DeepSeek-V3 (its own autocast, MTP logits in the loss, the router's fp32 bias buffer moved after the step; and
once with FP8 projections) and a dense transformers Qwen2 (the caller's autocast). Parameters reach the forward
gathered in bf16, gradients are reduce-scattered in bf16, the sharded master parameters, their gradients and
AdamW's state stay fp32, and 2 ranks on half a batch each get the gradient, and make the update, of one
unsharded bf16-autocast model on the whole batch within bf16 rounding (2e-2 of its norm). The update is an
SGD step's. With FP8 projections the bound is 1e-1: FP8 (3 mantissa bits) turns small differences into
whole FP8 steps. On this model, without FSDP, FP8-quantizing bf16-rounded copies of the weights instead of
the fp32 masters moves the gradient by 7%, and splitting the batch in two (the weight gradient's
token tiles change) by 2% (bf16 without FP8: 0.6% and 0.2%). AdamW's first step is about lr x sign(gradient) per coordinate, so a coordinate whose gradient is
rounding noise moves by a full lr either way and the comparison would measure that noise (AdamW still steps
the fp32 shards once, for the dtype of its state)."""
import dataclasses

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.model import ModelConfig, Precision, Transformer, apply_precision
from r1pipe.vocab import DENSE_PRESETS
from r1pipe.workers.sharding import gather_full, shard, undo_gradient_average
from r1pipe.workers.weight_sync import free_port

VOCAB = 33
LR = 1e-2  # an update well above the fp32 rounding of the weights it is added to


class RecordingReduceScatter(DefaultReduceScatter):
    """FSDP's reduce-scatter, noting the dtype of every gradient buffer it reduces."""

    def __init__(self, dtypes: set):
        self.dtypes = dtypes

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.dtypes.add(input_tensor.dtype)
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def v3_model(fp8: bool = False) -> Transformer:
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8, n_group=2,
                              topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=1, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2, max_position_embeddings=64)
    return apply_precision(Transformer(cfg, seed=0), Precision(dtype=torch.bfloat16, fp8=fp8))


def qwen2_model() -> torch.nn.Module:
    fields = dict(DENSE_PRESETS["tiny-qwen2"])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tokens(rows: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def loss_of(model: torch.nn.Module, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy / the global count; V3 adds its MTP module's (token t+2) the same way.
    A transformers model runs under bf16 autocast here, as its caller runs it; V3 autocasts itself."""
    if isinstance(model, Transformer):
        out = model(ids, mtp=True)
        logits, extra = out.logits, out.mtp_logits[0][:, :-2]
        loss = F.cross_entropy(extra.flatten(0, 1).float(), ids[:, 2:].flatten(), reduction="sum")
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = 0.0
    loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return loss / num_tokens


def relative_gap(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all the tensors together."""
    gap = sum(float((got[n].float() - w.float()).pow(2).sum()) for n, w in want.items())
    return (gap / sum(float(w.float().pow(2).sum()) for w in want.values())) ** 0.5


def _compare(rank: int, make) -> dict[str, float]:
    """One SGD step of `make()` unsharded on the whole batch and sharded on this rank's half; checks the
    dtypes along the way and returns the relative gaps of the gradients and the updates."""
    ids = tokens()
    whole, sharded = make(), make()
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    whole_opt = torch.optim.SGD(whole.parameters(), lr=LR)
    loss_of(whole, ids, ids.numel()).backward()
    want_grads = {n: p.grad.clone() for n, p in whole.named_parameters()}
    whole_opt.step()

    shard(sharded, compute_dtype=torch.bfloat16)
    sharded_opt = torch.optim.SGD(sharded.parameters(), lr=LR)
    reduced: set = set()
    for module in sharded.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(RecordingReduceScatter(reduced))
    seen: set = set()  # the dtype each projection's weight has when its forward runs
    linears = [m for m in sharded.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.add(m.weight.dtype)) for m in linears]
    half = ids[: len(ids) // 2] if rank == 0 else ids[len(ids) // 2:]
    loss_of(sharded, half, ids.numel()).backward()
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}, seen
    assert reduced == {torch.bfloat16}, reduced
    undo_gradient_average(sharded, 2)
    got_grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    sharded_opt.step()
    params = list(sharded.parameters())
    assert {p.dtype for p in params} == {p.grad.dtype for p in params} == {torch.float32}
    adamw = torch.optim.AdamW(params, lr=0.0, fused=True)
    adamw.step()  # the state it makes: fp32, like the shards
    assert {v.dtype for s in adamw.state.values() for v in s.values() if v.is_floating_point()} == {torch.float32}
    if isinstance(sharded, Transformer):  # the router's balancing bias: a buffer, fp32, moved after the step
        for model in (whole, sharded):
            model.update_router_bias()
        assert {b.dtype for n, b in sharded.named_buffers() if n.endswith("e_score_correction_bias")} == {torch.float32}
    after = gather_full(sharded)
    got_updates = {n: after[n] - before[n] for n in before}
    want_updates = {n: p.detach() - before[n] for n, p in whole.named_parameters()}
    return {"gradients": relative_gap(got_grads, want_grads), "update": relative_gap(got_updates, want_updates)}


def _two_ranks(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for name, make, tolerance in [("v3", v3_model, 2e-2), ("v3 fp8", lambda: v3_model(fp8=True), 1e-1),
                                  ("qwen2", qwen2_model, 2e-2)]:
        gaps = _compare(rank, make)
        print(f"rank {rank} {name}: {gaps}")
        assert gaps["gradients"] <= tolerance and gaps["update"] <= tolerance, (name, gaps)
    dist.destroy_process_group()


def test_bf16_gathers_and_reduces_in_bf16_over_fp32_masters_and_two_ranks_step_like_one():
    mp.spawn(_two_ranks, args=(free_port(),), nprocs=2)
