"""FSDP2 for the policy workers: sharding, activation checkpointing, memory accounting, checkpoints.

`shard` applies `torch.distributed.fsdp.fully_shard` to every main decoder block and then to the
whole model (embedding, final norm, head and any MTP module, which share the embedding and head,
form the root unit), so each rank holds 1/N of every parameter and, through the optimizer built on
the sharded parameters, 1/N of the AdamW state. Compute precision is the model's own (the recipe's
model.dtype runs the forward under autocast over the fp32 masters, exactly as on one worker);
gathered parameters stay fp32 and gradients are reduce-scattered in fp32, so N sharded workers
step like one. Works with gloo on CPU (torch >= 2.6) and NCCL on GPU.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its own shards and
any worker count (including one unsharded worker) reads them back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from r1pipe.model import save_pretrained
from r1pipe.model.transformer import Transformer


def shard(model: nn.Module) -> nn.Module:
    """fully_shard each decoder block, then the root (in place; parameters become DTensors)."""
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in model.blocks:  # type: ignore[attr-defined]
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


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


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every state-dict entry, one at a time; a sharded parameter is
    all-gathered, so every rank of the group must iterate together."""
    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on CPU (every rank of the group must call it; every rank gets it)."""
    return {name: t.to("cpu", copy=True) for name, t in full_tensors(model)}


def save_pretrained_full(state: dict[str, torch.Tensor], config: object, path: str | Path) -> None:
    """Write the Hugging Face layout checkpoint from a full state dict (full_state_dict on every
    rank, then this on one)."""
    with torch.device("meta"):
        shell = Transformer(config)  # type: ignore[arg-type]
    shell.load_state_dict(state, assign=True)
    save_pretrained(shell, path)


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
