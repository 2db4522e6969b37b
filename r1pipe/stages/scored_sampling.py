"""k samples per prompt from rollout workers, scored on the RewardPool while generation goes on.

Used by the stages that sample a checkpoint and grade what it wrote (rejection sampling, the
per-domain scorecard). Each rollout worker gets its share of the prompts in one call and streams
back the prompts that finish after each engine step (a Ray streaming generator over the engine's
`iter_generate`, r1pipe's or vLLM's), so its continuous batch stays full while the driver scores what has
finished on the reward actors (code sandboxes, math verification): scoring overlaps generation
instead of following it, and no batch drains at chunk boundaries. Results come out in chunks of
prompts (the stages' shards), in order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import ray

from r1pipe.data.rows import PromptRow
from r1pipe.rewards.worker import RewardPool
from r1pipe.stages.sections import SamplingResources
from r1pipe.workers import RolloutWorker
from r1pipe.workers.placement import ResourcePlan, reserve, role_resources


@dataclass(frozen=True)
class Sampling:
    """Sampling settings (recorded with every sample they produced)."""

    k: int = 4
    temperature: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ("</answer>",)
    seed: int = 0

    def prompt_seed(self, index: int) -> int:
        """The seed of prompt `index`: a resumed or re-chunked build draws the same samples."""
        return (self.seed * 1_000_003 + index * 7919 + 12345) % (2**31)


@dataclass
class Sample:
    text: str  # the completion as the rewards see it (stop string kept)
    num_tokens: int
    finish_reason: str
    total: float  # weighted reward
    components: dict[str, float]  # reward name -> value (the rewards routed to this row)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class ScoredChunk:
    start: int  # index of the chunk's first prompt in the sampled sequence
    rows: list[PromptRow]
    samples: list[list[Sample]]  # per row, k samples in generation order
    generate_seconds: float  # wall time from the run's start until the chunk's last prompt was generated and scored


class ScoredSampler:
    """Rollout workers for one checkpoint plus a RewardPool; `run(rows, chunk_size)` yields each
    chunk's scored samples in order. Ray must be initialised (r1pipe.workers.cluster.ray_init)."""

    def __init__(self, model_path: str, sampling: Sampling, reward_weights: dict[str, float],
                 reward_options: dict[str, Any] | None = None, *, resources: SamplingResources | None = None,
                 engine: dict[str, Any] | None = None, key: str = "resources", backend: str = "engine"):
        """The rollout workers are placed in a placement group reserved up front (r1pipe.workers.placement:
        a cluster too small fails at once with the arithmetic); `key` is the recipe section that errors name;
        `backend`: the workers' engine (r1pipe.engine.backend.open_engine: engine or vllm)."""
        self.sampling = sampling
        r = resources or SamplingResources()
        plan = ResourcePlan([role_resources("rollout", r.rollout, f"{key}.rollout"),
                             role_resources("reward", r.reward, f"{key}.reward", in_group=False)])
        self.placement = reserve(plan, r.placement_timeout_s, r.placement_strategy, stage="sampling")
        kwargs = {"device": r.device, **dict(engine or {})}
        self.workers = [ray.remote(RolloutWorker).options(**self.placement.options("rollout", i)).remote(
                            model_path, kwargs, sampling.seed + i, r.rollout.threads or None, backend=backend)
                        for i in range(r.rollout.workers)]
        self.pool = RewardPool(dict(reward_weights), num_workers=r.reward.workers, num_cpus_per_worker=r.reward.cpus,
                               threads_per_worker=r.reward.threads or None, resources=dict(r.reward.custom),
                               **dict(reward_options or {}))

    def _stream(self, worker: Any, rows: Sequence[PromptRow], positions: list[int]) -> Any:
        s = self.sampling
        return worker.generate_stream.options(num_returns="streaming").remote(
            [rows[p].prompt_ids for p in positions], s.k, s.temperature, s.max_tokens,
            [s.prompt_seed(p) for p in positions], list(s.stop) or None)

    def run(self, rows: Sequence[PromptRow], chunk_size: int, chunks: Iterable[int] | None = None) -> Iterator[ScoredChunk]:
        """Scored chunks of `rows` (chunk j = rows[j*chunk_size:(j+1)*chunk_size]), in chunk order;
        `chunks` picks which ones (default: all)."""
        todo = sorted(chunks) if chunks is not None else list(range((len(rows) + chunk_size - 1) // chunk_size))
        bounds = {j: range(j * chunk_size, min((j + 1) * chunk_size, len(rows))) for j in todo}
        positions = [p for j in todo for p in bounds[j]]
        n = len(self.workers)
        parts = [positions[w * len(positions) // n:(w + 1) * len(positions) // n] for w in range(n)]
        start = time.perf_counter()
        streams = {self._stream(w, rows, part): part for w, part in zip(self.workers, parts) if part}
        samples: dict[int, list[Sample]] = {}  # prompt position -> its scored samples
        finished_at: dict[int, float] = {}  # chunk -> seconds from start until its last prompt finished
        for j in todo:
            while not all(p in samples for p in bounds[j]):
                self._score_ready(rows, streams, samples)
                for c in todo:
                    if c not in finished_at and all(p in samples for p in bounds[c]):
                        finished_at[c] = time.perf_counter() - start
            part = list(rows[bounds[j].start:bounds[j].stop])
            yield ScoredChunk(bounds[j].start, part, [samples.pop(p) for p in bounds[j]], finished_at[j])

    def _score_ready(self, rows: Sequence[PromptRow], streams: dict[Any, list[int]], samples: dict[int, list[Sample]]) -> None:
        """Wait for the workers' next finished prompts, take every other one streamed by then too,
        score them in one batch, and file their samples by prompt position."""
        done: list[tuple[int, list[Any]]] = []
        timeout = None
        while streams:
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=timeout)
            if not ready:
                break
            try:
                ref = next(ready[0])
            except StopIteration:
                del streams[ready[0]]
                continue
            part = streams[ready[0]]
            done.extend((part[i], completions) for i, completions in ray.get(ref))
            timeout = 0  # after the first, only what is already there
        if not done:
            raise RuntimeError("the rollout workers finished without returning every prompt")
        scored = self._score([rows[p] for p, _ in done], [completions for _, completions in done])
        samples.update({p: group for (p, _), group in zip(done, scored)})

    def _score(self, rows: list[PromptRow], outs: list[list[Any]]) -> list[list[Sample]]:
        """Score each prompt's completions (r1pipe.workers.Completion, text with its stop string)."""
        flat = [(r, c) for r, group in zip(rows, outs) for c in group]
        # a text sampled twice for one prompt (common once a policy is confident) is scored once
        unique: dict[tuple[str, str], int] = {}
        slot = [unique.setdefault((r.id, c.text), len(unique)) for r, c in flat]
        firsts = {i: k for k, i in reversed(list(enumerate(slot)))}
        order = [firsts[i] for i in range(len(unique))]
        scored = self.pool.score([flat[k][1].text for k in order], [dict(flat[k][0].reference) for k in order])
        results = [scored[i] for i in slot]
        samples = [Sample(c.text, len(c.token_ids), c.finish_reason, float(res.total),
                          {k: float(v) for k, v in res.components.items()},
                          dict(res.info.get("errors") or {}) if isinstance(res.info, dict) else {})
                   for (_, c), res in zip(flat, results)]
        k = self.sampling.k
        return [samples[i * k:(i + 1) * k] for i in range(len(rows))]

    def shutdown(self) -> None:
        self.pool.shutdown()
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        self.placement.remove()
