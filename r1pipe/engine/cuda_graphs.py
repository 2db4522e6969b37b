"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step launches hundreds of small kernels (per layer: norms, projections, routing, grouped experts,
attention), so at small and medium batches the GPU waits on the CPU. The runner's `decode_forward` has no host
synchronisation and, padded to a bucket with a fixed block-table width (`ModelRunner.plan_static`), fixed
shapes; it is captured once per bucket on first use and replayed: the step's inputs (token ids, positions,
and the cache plan, which `PagedCache.pin_plan` keeps in the same buffers) are copied into the tensors
the graph reads, and one replay launches the whole step.

The graphs read the model's weights and the cache pool where they were at capture: weights updated in place
(`LLM.update_weights`, the weight sync's bucket copies) are seen; a parameter whose storage moved (the weight
sync's first `rehome`) drops every graph, and they are captured again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the runner imports this module
    from r1pipe.engine.runner import Batch, ModelRunner


@dataclass
class CapturedStep:
    """One bucket's graph and the tensors it reads (ids, positions [B, 1]) and writes (logits, routing)."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    routing: torch.Tensor


class DecodeGraphs:
    """The runner's decode steps replayed from per-bucket CUDA graphs (see the module docstring)."""

    def __init__(self, runner: "ModelRunner") -> None:
        if runner.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.runner = runner
        self.steps: dict[int, CapturedStep] = {}
        self.pool = None  # one memory pool shared by every bucket's graph
        self._weights: list[tuple[torch.Tensor, int]] = []
        self.captures = 0  # graphs captured so far (a re-capture after moved weights counts again)

    def run(self, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """logits [n, V] and expert ids [MoE layers, n, k] of the batch's n rows (views of the graph's outputs,
        valid until the next replay)."""
        n = batch.ids.shape[0]
        if self._weights_moved():
            self.steps.clear()
        padded = self.runner.plan_static(batch)
        B = padded.ids.shape[0]
        step = self.steps.get(B)
        if step is None:
            step = self.steps[B] = self._capture(padded)
        else:
            step.ids.copy_(padded.ids, non_blocking=True)
            step.positions.copy_(padded.positions, non_blocking=True)
        step.graph.replay()
        return step.logits[:n], step.routing[:, :n]

    def _capture(self, padded: "Batch") -> CapturedStep:
        runner = self.runner
        runner.cache.pin_plan()  # this plan's tensors are the ones every later plan of the bucket is copied into
        ids, positions = padded.ids.to(runner.device), padded.positions.to(runner.device)
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(stream):  # warm-up: kernel selection, Triton compiles, lazy buffers
            for _ in range(2):
                runner.decode_forward(ids, positions)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, routing = runner.decode_forward(ids, positions)
        self.pool = graph.pool()
        self.captures += 1
        module = runner.model.module
        self._weights = [(t, t.data_ptr()) for t in (*module.parameters(), *module.buffers())]
        return CapturedStep(graph, ids, positions, logits, routing)

    def _weights_moved(self) -> bool:
        return any(t.data_ptr() != ptr for t, ptr in self._weights)
