"""Absorbed MLA attention over the paged latent cache: the torch path and the Triton kernel behind one call.

Both compute, for each query (row b, position p, head h) against its row's keys 0..p,

    out[h] = softmax_t((q_latent[h] . latent[t] + q_rope[h] . k_rope[t]) * scale) @ latent[t]

which is the middle of r1pipe.model's absorbed MLA (q_latent = q_nope @ W_UK before, out @ W_UV after).
The torch path gathers each row's keys in position order (fastest on CPU for small models); the Triton
kernel (r1pipe.engine.mla_kernel) reads the pool through the block table without a dense copy.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _kernel_module() -> ModuleType | None:
    try:
        from r1pipe.engine import mla_kernel
    except ImportError:  # no triton: the torch path serves every call
        return None
    return mla_kernel


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when triton is importable, else 'torch'. 'triton' on CPU needs
    TRITON_INTERPRET=1 set before triton's first import (tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _kernel_module() is not None else "torch"
    if backend == "triton":
        if _kernel_module() is None:
            raise RuntimeError("attention backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton attention kernel on CPU needs TRITON_INTERPRET=1 set before importing triton")
    return backend


def paged_kernel(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                 table: torch.Tensor, query_pos: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """The Triton kernel (see r1pipe.engine.mla_kernel.paged_mla for shapes)."""
    module = _kernel_module()
    if module is None:
        raise RuntimeError("the paged MLA kernel needs triton")
    return module.paged_mla(q_latent, q_rope, kv, pe, table, query_pos, block_size, scale)
