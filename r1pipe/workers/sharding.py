"""FSDP2 for the policy workers: sharding, activation checkpointing, memory accounting, checkpoints.

`shard` applies `torch.distributed.fsdp.fully_shard` to every main decoder block and then to the
whole model (embedding, final norm, head and any MTP module, which share the embedding and head,
form the root unit), so each rank holds 1/N of every parameter and, through the optimizer built on
the sharded parameters, 1/N of the AdamW state. Compute precision is the model's own (the recipe's
model.dtype runs the forward under autocast over the fp32 masters, exactly as on one worker);
gathered parameters stay fp32 and gradients are reduce-scattered in fp32, so N sharded workers
step like one. Works with gloo on CPU (torch >= 2.6) and NCCL on GPU.

`shard(keep_gathered=True)` with `accumulate` gathers the parameters and reduce-scatters the
gradients once per step instead of once per micro-batch. `gather_full` hands the whole model to
weight sync and the Hugging Face export (gathered_model) in one all-gather per dtype.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its own shards and
any worker count (including one unsharded worker) reads them back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from r1pipe.model.transformer import Transformer


def shard(model: nn.Module, keep_gathered: bool = False) -> nn.Module:
    """fully_shard each decoder block, then the root (in place; parameters become DTensors). With
    `keep_gathered`, a forward leaves the blocks gathered (see accumulate; reshard frees them)."""
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in model.blocks:  # type: ignore[attr-defined]
        fully_shard(block, mp_policy=policy, reshard_after_forward=not keep_gathered)
    fully_shard(model, mp_policy=policy)
    return model


def accumulate(model: nn.Module, last_micro_batch: bool) -> None:
    """Gradient accumulation without per-micro-batch collectives, for a model sharded with
    keep_gathered: until the step's last micro-batch the parameters stay gathered (no all-gather per
    block and micro-batch, forward or backward) and the gradients accumulate unsharded (no
    reduce-scatter); the last backward reduce-scatters their sum once and reshards. The price: a whole
    unsharded model and gradient at peak during the step (FSDP1's no_sync)."""
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
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(world_size)


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's attention in the backward instead of keeping its activations.
    Only attention: an MoE layer's forward counts expert loads, which a recompute would count twice."""
    for block in model.blocks:  # type: ignore[attr-defined]
        checkpoint(block.self_attn)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds: {'parameters': ..., 'optimizer': ...} (local shards only)."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    state = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            state += sum(_local(v).numel() * _local(v).element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return {"parameters": params, "optimizer": state}


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
        if hasattr(t, "to_local"):
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


def gathered_model(model: nn.Module) -> nn.Module:
    """A copy of the model built on the meta device and holding the full tensors of gather_full (every
    rank of the group must call it together); its state dict is the Hugging Face layout (per-expert keys)."""
    with torch.device("meta"):
        shell = Transformer(model.config)  # type: ignore[arg-type]
    shell.load_state_dict(gather_full(model), assign=True)
    return shell


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


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a DCP checkpoint written by any number of ranks into this rank's (sharded or whole) model
    and optimizer."""
    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
