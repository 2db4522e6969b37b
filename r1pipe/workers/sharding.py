"""FSDP2 for the policy workers: sharding, activation checkpointing, memory accounting, checkpoints.

Two families of model: r1pipe's DeepSeek-V3 (`Transformer`) and a dense Hugging Face causal LM that
transformers builds (Qwen2, Llama, ...: decoder layers at `model.model.layers`). `shard` applies
`torch.distributed.fsdp.fully_shard` to every decoder block (`decoder_blocks`) and then to the whole
model: the embedding, final norm and head (tied or not) and V3's MTP modules, which share the
embedding and head, form the root unit. Each rank holds 1/N of every parameter and, through the
optimizer built on the sharded parameters, 1/N of the AdamW state.

Precision (`precision_policy`): the sharded parameters are the fp32 masters whatever the compute
dtype. In fp32, parameters are gathered and gradients reduce-scattered in fp32, so N sharded workers
step like one (within float rounding). In bf16 (the model's `compute_dtype`, which r1pipe.causal_lm
sets for either family; run_model runs a transformers model under autocast, V3 autocasts inside),
parameters are gathered in bf16 and gradients reduce-scattered in bf16, then added to fp32 sharded
gradients that the optimizer steps with fp32 state: half the traffic and the gathered model's memory. Every floating-point parameter
is gathered in bf16 (norm weights and V3's router gate too: the gate upcasts its weight itself);
buffers (rope tables, the router's bias) are not parameters and keep their dtype.
Works with gloo on CPU (torch >= 2.6) and NCCL on GPU.

`shard(keep_gathered=True)` with `accumulate` gathers the parameters and reduce-scatters the
gradients once per step instead of once per micro-batch. `gather_full` hands the whole model to
weight sync and the Hugging Face export (gathered_model) in one all-gather per dtype.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its own shards and
any worker count (including one unsharded worker) reads them back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers import AutoModelForCausalLM, PreTrainedModel

from r1pipe import causal_lm
from r1pipe.model.expert_parallel import ExpertShard
from r1pipe.model.experts import PROJECTIONS
from r1pipe.model.transformer import Transformer


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that each become an FSDP unit: r1pipe V3's main blocks (`model.blocks`; its
    MTP modules share the embedding and head, so they stay in the root unit with them), or a
    transformers causal LM's decoder layers (`model.model.layers`)."""
    if isinstance(model, Transformer):
        return model.blocks
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(model, PreTrainedModel) and isinstance(layers, nn.ModuleList):
        return list(layers)
    raise TypeError(f"{type(model).__name__}: FSDP sharding takes r1pipe's DeepSeek-V3 or a transformers causal LM "
                    "with its decoder layers at .model.layers")


def precision_policy(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """float32: parameters gathered and gradients reduced in fp32 (N workers step like one).
    bfloat16: gathered in bf16 and reduce-scattered in bf16; the fp32 shards stay the masters (FSDP
    adds each reduced gradient to their fp32 gradient). Forward inputs pass through uncast: each
    model keeps its own dtype rules (V3's fp32 rope tables, a transformers model's attention masks)."""
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    if compute_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, cast_forward_inputs=False)
    raise ValueError(f"FSDP compute dtype {compute_dtype}: float32 or bfloat16 expected")


def shard(model: nn.Module, keep_gathered: bool = False, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard each decoder block (decoder_blocks), then the root (in place; parameters become
    DTensors), gathering and reducing in `compute_dtype` (precision_policy; None: the model's own,
    r1pipe.causal_lm.compute_dtype). Routed experts that expert parallelism placed (expert_parameters) are
    left to it. With `keep_gathered`, a forward leaves the blocks gathered (see accumulate; reshard frees them)."""
    policy = precision_policy(causal_lm.compute_dtype(model) if compute_dtype is None else compute_dtype)
    ignored = set(expert_parameters(model)) or None
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=not keep_gathered, ignored_params=ignored)
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    return model


# ---------------------------------------------------------------- expert parallelism (r1pipe V3)

def expert_mesh(world_size: int, ep_size: int, device_type: str) -> DeviceMesh:
    """The trainer ranks as a (dp, ep) mesh: ep_size consecutive ranks share one copy of every layer's
    routed experts, each holding 1/ep_size of them; the world_size / ep_size such groups are replicas."""
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split every MoE layer's routed experts (main and MTP layers) over `mesh`'s ep dimension (in place; call
    before `shard`, which then leaves them alone). Each stacked expert weight becomes a DTensor, replicated
    over dp and cut on the expert dimension over ep: this rank keeps its experts' rows (as torch.chunk cuts
    them), the forward sends tokens to them (r1pipe.model.expert_parallel), and a checkpoint (DCP, keyed by
    the whole tensor) reads back into any ep_size. The routers, shared experts and everything else stay
    whole here, for FSDP to shard over all ranks."""
    if not isinstance(model, Transformer):
        raise TypeError(f"{type(model).__name__}: expert parallelism splits r1pipe DeepSeek-V3's routed experts")
    ep = mesh["ep"]
    expert_shard = ExpertShard(ep.get_group(), ep.size(), ep.get_local_rank())
    for moe in model.moe_layers():
        start, end = expert_shard.local_range(moe.experts.num_experts)
        for name in PROJECTIONS:
            whole = getattr(moe.experts, name)
            piece = DTensor.from_local(whole.detach()[start:end].clone(), mesh, [Replicate(), Shard(0)], run_check=False)
            setattr(moe.experts, name, nn.Parameter(piece, requires_grad=whole.requires_grad))
        moe.expert_shard = expert_shard
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert weights expert parallelism placed (apply_expert_parallel), in model order."""
    if not isinstance(model, Transformer):
        return []
    return [getattr(moe.experts, name) for moe in model.moe_layers() if moe.expert_shard is not None
            for name in PROJECTIONS]


def reduce_expert_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Sum the expert-parallel weights' gradients over the dp replicas. Each already sums every ep rank's
    tokens (the backward of the dispatch), so afterwards it is the whole step's sum, as the sharded
    parameters' are after undo_gradient_average."""
    if mesh["dp"].size() == 1:
        return
    for p in expert_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad.to_local(), op=dist.ReduceOp.SUM, group=mesh["dp"].get_group())


def accumulate(model: nn.Module, last_micro_batch: bool) -> None:
    """Gradient accumulation without per-micro-batch collectives, for a model sharded with
    keep_gathered: until the step's last micro-batch the parameters stay gathered (no all-gather per
    block and micro-batch, forward or backward) and the gradients accumulate unsharded (no
    reduce-scatter); the last backward reduce-scatters their sum once and reshards. The price: a whole
    unsharded model and gradient at peak during the step (FSDP1's no_sync). In bf16 the unsharded
    gradients also accumulate in bf16 until that reduce-scatter."""
    model.set_requires_gradient_sync(last_micro_batch)  # type: ignore[operator]
    model.set_reshard_after_backward(last_micro_batch)  # type: ignore[operator]


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter: FSDP registers the sharded parameters again (a forward-only pass leaves the
    root gathered, and every block when sharded with keep_gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def undo_gradient_average(model: nn.Module, world_size: int) -> None:
    """FSDP's reduce-scatter averages gradients over ranks; the GRPO loss already divides by the
    global token / sequence counts, so the step needs their sum (gloo has no PREMUL_SUM for
    set_gradient_divide_factor(1.0), hence the rescale)."""
    placed = {id(p) for p in expert_parameters(model)}  # summed by their own collectives
    for p in model.parameters():
        if p.grad is not None and id(p) not in placed:
            p.grad.mul_(world_size)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) over parameters that may live on different device meshes (FSDP's
    and expert parallelism's, whose norms torch cannot stack): each mesh's gradients' norm, then the global
    norm of those, then each mesh's gradients scaled by the same coefficient. Returns the global norm (a plain
    tensor, the same on every rank)."""
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if not groups:
        return torch.zeros(())
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute activations in the backward instead of keeping them. r1pipe V3: each main block's
    attention only (an MoE layer's forward counts expert loads, which a recompute would count twice).
    A transformers model: each whole decoder layer (attention and MLP: nothing in it counts, and the
    MLP's activations are the larger part), through transformers' own gradient checkpointing, which
    keeps the layer's KV-cache writes out of the recompute and FSDP's hooks outside the checkpoint."""
    if isinstance(model, Transformer):
        for block in model.blocks:
            checkpoint(block.self_attn)
        return model
    decoder_blocks(model)  # a clear error for a model of neither family
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these tensors as this rank holds them (a sharded one's local shard)."""
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds: {'parameters': ..., 'optimizer': ...} (local shards only)."""
    state = 0
    if optimizer is not None:
        state = sum(tensor_bytes(v for v in s.values() if isinstance(v, torch.Tensor)) for s in optimizer.state.values())
    return {"parameters": tensor_bytes(model.parameters()), "optimizer": state}


ENTRY_BYTES = 2560  # what a checkpoint adds per tensor saved: its torch.save record (and its line in DCP's .metadata)


def checkpoint_bytes(model: nn.Module) -> int:
    """About the bytes this rank's share of a checkpoint of `model` and its AdamW state takes (save_sharded's
    DCP shards, or a torch.save of both as the pretrain and sft stages write): parameters and buffers, two
    moments per trainable parameter (counted before the first step too), and ENTRY_BYTES per tensor saved
    (each moment and step counter is one)."""
    tensors = [*model.parameters(), *model.buffers()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return tensor_bytes(tensors) + 2 * tensor_bytes(trainable) + ENTRY_BYTES * (len(tensors) + 3 * len(trainable))


def _persistent(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(module path, tensor) of every parameter and persistent buffer, under each name it has (the MTP
    module shares the embedding and head): what the model's state dict holds."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            yield dot + name, p
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield dot + name, b


def gather_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> full tensor of every parameter and persistent buffer. FSDP2's shards (dim 0 cut
    as torch.chunk does) travel in one all-gather per dtype, each rank's rows padded to ceil(rows /
    ranks), rather than one collective per tensor (hundreds a step, one per expert). Every rank of the
    group calls it and gets the whole model: one full copy at peak."""
    reshard(model)  # a forward-only pass can leave units gathered: their registered parameters are then plain
    names: dict[int, list[str]] = {}
    sharded: dict[torch.dtype, dict[int, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for name, t in _persistent(model):
        if isinstance(t, DTensor) and t.device_mesh.ndim > 1:  # expert-parallel weights: one collective each
            full[name] = t.full_tensor().detach()
        elif hasattr(t, "to_local"):
            names.setdefault(id(t), []).append(name)
            sharded.setdefault(t.dtype, {})[id(t)] = t
        else:
            full[name] = t.detach()
    for tensors in sharded.values():
        first = next(iter(tensors.values()))
        world, rank = first.device_mesh.size(), first.device_mesh.get_local_rank()
        rows = {key: -(-t.shape[0] // world) for key, t in tensors.items()}  # rows of every rank but the last ones
        padded = []
        for key, t in tensors.items():
            local = t.to_local().detach()
            if local.shape[0] != max(0, min(rows[key], t.shape[0] - rank * rows[key])):
                raise RuntimeError(f"{names[key][0]}: a local shard of {local.shape[0]} rows is not torch.chunk's")
            padded.append(torch.cat([local, local.new_zeros(rows[key] - local.shape[0], *local.shape[1:])]).reshape(-1))
        mine = torch.cat(padded)
        everyone = mine.new_empty(world * mine.numel())
        dist.all_gather_single(everyone, mine, group=first.device_mesh.get_group())
        everyone, offset = everyone.view(world, -1), 0
        for key, t in tensors.items():
            size = rows[key] * math.prod(t.shape[1:])
            whole = everyone[:, offset : offset + size].reshape(world * rows[key], *t.shape[1:])[: t.shape[0]]
            full.update((name, whole) for name in names[key])
            offset += size
    return full


def empty_copy(model: nn.Module) -> nn.Module:
    """A model of the same architecture and config with no storage (its tensors on the meta device):
    a Transformer, or the transformers causal LM its config names."""
    with torch.device("meta"):
        if isinstance(model, Transformer):
            return Transformer(model.config)
        return AutoModelForCausalLM.from_config(model.config)


def tie_like(copy: nn.Module, model: nn.Module) -> None:
    """Make parameters that are one object in `model` (a tied embedding and head, V3's MTP sharing them)
    one object in `copy` too (load_state_dict(assign=True) gives each name its own Parameter)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
            continue
        path, _, attr = name.rpartition(".")
        setattr(copy.get_submodule(path), attr, copy.get_parameter(first[id(p)]))


def copy_non_persistent_buffers(copy: nn.Module, model: nn.Module) -> None:
    """Give `copy` the buffers no state dict holds (rope tables, expert loads), cloned from `model`, so
    that it runs as well as it saves."""
    for path, module in model.named_modules():
        for name, b in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                copy.get_submodule(path).register_buffer(name, b.detach().clone(), persistent=False)


def gathered_model(model: nn.Module) -> nn.Module:
    """A whole, unsharded copy of the model holding the full tensors of gather_full (every rank of the
    group must call it together), its tied parameters tied: r1pipe's save_pretrained writes a V3 one
    (Hugging Face layout, per-expert keys), `.save_pretrained()` a transformers one."""
    copy = empty_copy(model)
    copy.load_state_dict(gather_full(model), assign=True)
    tie_like(copy, model)
    copy_non_persistent_buffers(copy, model)
    return copy


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every state-dict entry, in state-dict order; a sharded model is gathered
    first (every rank of the group must call this together)."""
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    yield from (gathered_model(model) if sharded else model).state_dict().items()


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{'model', 'optimizer'} as DCP state, keyed by module path (not the HF names: the stacked experts'
    per-expert HF keys are views DCP cannot map), sharded where the model is. The model entries
    share storage with the parameters and buffers, so loading into them loads the model."""
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors.update(model.named_buffers())
    return {"model": tensors, "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and the optimizer under `path`."""
    dcp.save(dcp_state(model, optimizer), checkpoint_id=str(path))


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter of `optimizer` its state, by one step at learning rate 0 on zero
    gradients (the weights do not move); the gradients are left as they were. A parameter stepped
    before has its state advanced too: call it only to make room for a state that is then loaded."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a DCP checkpoint written by any number of ranks into this rank's (sharded or whole) model
    and optimizer. The optimizer ends with exactly the checkpoint's state: every parameter that had
    one when it was written gets it back, one that had none (never stepped: e.g. the MTP module of a
    run without the draft loss, whose gradient stays None on one worker) has none.

    (DCP loads in place into the entries of the state dict it is given, so the optimizer's must exist
    first: get_optimizer_state_dict creates them only for an optimizer with no state and no gradient,
    which a replica's flat gradient buffer rules out; they are made here, for every parameter, and those
    the checkpoint lacks are left out of the load.)"""
    init_optimizer_state(optimizer)
    state = dcp_state(model, optimizer)
    written = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state["optimizer"]["state"] = {
        fqn: entry for fqn, entry in state["optimizer"]["state"].items()
        if any(f"optimizer.state.{fqn}.{key}" in written for key in entry)
    }
    dcp.load(state, checkpoint_id=str(path))
    # strict=False: a parameter without state in the checkpoint is left without one
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
