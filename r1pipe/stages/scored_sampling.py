"""k samples per prompt from a generation group, scored on the RewardPool while generation goes on.

Used by the stages that sample a checkpoint and grade what it wrote (rejection sampling, the
per-domain scorecard). The group's workers (r1pipe.workers.generation) each get their share of the
prompts in one call and stream back (r1pipe's engine or vLLM's `iter_generate`) the prompts that finish after each engine step, so their
continuous batches stay full while the driver scores what has finished on the reward actors (code
sandboxes, math verification): scoring overlaps generation instead of following it, and no batch
drains at chunk boundaries. Results come out in chunks of prompts (the stages' shards), in order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from r1pipe.data.rows import PromptRow
from r1pipe.rewards.worker import RewardPool
from r1pipe.stages.sections import SamplingResources
from r1pipe.workers.generation import GenerationGroup, Sampling

__all__ = ["Sample", "Sampling", "ScoredChunk", "ScoredSampler"]


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
    """A generation group for one checkpoint plus a RewardPool; `run(rows, chunk_size)` yields each
    chunk's scored samples in order. Ray must be initialised (r1pipe.workers.cluster.ray_init)."""

    def __init__(self, model_path: str, sampling: Sampling, reward_weights: dict[str, float],
                 reward_options: dict[str, Any] | None = None, *, resources: SamplingResources | None = None,
                 engine: dict[str, Any] | None = None, key: str = "resources", backend: str = "engine"):
        """The group reserves its placement group up front (a cluster too small fails at once with the
        arithmetic, reward workers counted); `key` is the recipe section that errors name; `backend`: the
        workers' engine (r1pipe.engine.backend.open_engine: engine or vllm)."""
        self.sampling = sampling
        r = resources or SamplingResources()
        self.group = GenerationGroup.reserve(model_path, r, key=key, seed=sampling.seed, engine=engine, backend=backend)
        try:
            self.pool = RewardPool(dict(reward_weights), num_workers=r.reward.workers, num_cpus_per_worker=r.reward.cpus,
                                   threads_per_worker=r.reward.threads or None, resources=dict(r.reward.custom),
                                   **dict(reward_options or {}))
        except BaseException:
            self.group.shutdown()
            raise

    def run(self, rows: Sequence[PromptRow], chunk_size: int, chunks: Iterable[int] | None = None) -> Iterator[ScoredChunk]:
        """Scored chunks of `rows` (chunk j = rows[j*chunk_size:(j+1)*chunk_size]), in chunk order;
        `chunks` picks which ones (default: all). Prompt p samples with sampling.prompt_seed(p)."""
        todo = sorted(chunks) if chunks is not None else list(range((len(rows) + chunk_size - 1) // chunk_size))
        bounds = {j: range(j * chunk_size, min((j + 1) * chunk_size, len(rows))) for j in todo}
        positions = [p for j in todo for p in bounds[j]]
        start = time.perf_counter()
        stream = self.group.stream([rows[p].prompt_ids for p in positions], self.sampling,
                                   [self.sampling.prompt_seed(p) for p in positions])
        samples: dict[int, list[Sample]] = {}  # prompt position -> its scored samples
        finished_at: dict[int, float] = {}  # chunk -> seconds from start until its last prompt finished
        for j in todo:
            while not all(p in samples for p in bounds[j]):
                done = next(stream, None)
                if done is None:
                    raise RuntimeError("the rollout workers finished without returning every prompt")
                scored = self._score([rows[positions[i]] for i, _ in done], [completions for _, completions in done])
                samples.update({positions[i]: group for (i, _), group in zip(done, scored)})
                for c in todo:
                    if c not in finished_at and all(p in samples for p in bounds[c]):
                        finished_at[c] = time.perf_counter() - start
            part = list(rows[bounds[j].start:bounds[j].stop])
            yield ScoredChunk(bounds[j].start, part, [samples.pop(p) for p in bounds[j]], finished_at[j])

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
        self.group.shutdown()
