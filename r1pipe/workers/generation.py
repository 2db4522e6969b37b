"""GenerationGroup: N data-parallel RolloutWorker actors (r1pipe.workers.rollout) driven as one, the one way
the project generates: GRPO's rollouts and held-out checks, rejection sampling, the scorecard, the pretrain
stage's base check and `r1pipe eval`.

The workers sit in bundles of a placement group (r1pipe.workers.placement): the stage's own (GRPO reserves one
for its trainers, engines and reward workers) or one the group reserves for itself (`GenerationGroup.reserve`).
Prompts (token ids or texts) are split into contiguous parts, one per worker, and every prompt samples with a
seed of its own, so which worker draws a prompt does not change its samples; results come back in prompt order.
A completion ended by a stop string keeps it, and nothing after it (the engine's include_stop_str_in_output).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from r1pipe.stages.sections import SamplingResources
from r1pipe.tracking.progress import StepProgress
from r1pipe.workers.batch import Completion
from r1pipe.workers.placement import Placement, ResourcePlan, reserve, role_resources
from r1pipe.workers.rollout import RolloutWorker

Prompts = Sequence[str] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class Sampling:
    """How a group samples (recorded with every sample it produced): `k` completions per prompt at
    `temperature` (0: greedy) and `top_p`, at most `max_tokens` each, ended by any of `stop`."""

    k: int = 4
    temperature: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ("</answer>",)
    seed: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def prompt_seed(self, index: int) -> int:
        """The seed of prompt `index`: a resumed or re-chunked run draws the same samples."""
        return (self.seed * 1_000_003 + index * 7919 + 12345) % (2**31)


class Pending:
    """A generation the group has started (`GenerationGroup.submit`); `result()` waits for it."""

    def __init__(self, refs: list[Any]):
        self.refs = refs  # one Ray reference per worker's part, in prompt order
        self._done: list[list[Completion]] | None = None

    def result(self) -> list[list[Completion]]:
        """The completions of each prompt, in prompt order."""
        if self._done is None:
            self._done = [group for part in ray.get(self.refs) for group in part]
            self.refs = []
        return self._done


class GenerationGroup:
    """`workers` RolloutWorker actors of the checkpoint `model_path`, actor i in bundle i of `role` in
    `placement` and seeded `seed + i` (per-prompt seeds decide the samples; see `generate`)."""

    def __init__(self, model_path: str, placement: Placement, *, workers: int, engine: dict[str, Any] | None = None,
                 seed: int = 0, threads: int | None = None, backend: str = "engine", role: str = "rollout",
                 owns_placement: bool = False, concurrency: int = 1):
        """`engine`: the engine's options (r1pipe.engine.LLM's, or VLLMEngine's for backend "vllm"); `threads`:
        torch threads per actor (None: Ray's per-actor default); `owns_placement`: `shutdown` removes it;
        `concurrency`: calls an actor runs at once (Ray's max_concurrency): 2 lets a worker take weights
        while it generates (GRPO's partial rollouts)."""
        actor = ray.remote(RolloutWorker)
        self.placement, self.owns_placement = placement, owns_placement
        self.workers = [actor.options(**placement.options(role, i), max_concurrency=concurrency).remote(
                            str(model_path), dict(engine or {}), seed + i, threads, backend)
                        for i in range(workers)]

    @classmethod
    def reserve(cls, model_path: str, resources: SamplingResources, *, key: str = "resources", seed: int = 0,
                engine: dict[str, Any] | None = None, backend: str = "engine", with_reward: bool = True,
                stage: str = "sampling") -> "GenerationGroup":
        """A group in a placement group of its own, made from `resources.rollout` (on `resources.device`) and
        checked, with `resources.reward` when `with_reward` (a RewardPool beside it; not placed in the group),
        against the cluster before any actor starts (r1pipe.workers.placement.reserve); `key` is the recipe
        section that errors name. Ray must be initialised (r1pipe.workers.cluster.ray_init)."""
        roles = [role_resources("rollout", resources.rollout, f"{key}.rollout")]
        if with_reward:
            roles.append(role_resources("reward", resources.reward, f"{key}.reward", in_group=False))
        placement = reserve(ResourcePlan(roles), resources.placement_timeout_s, resources.placement_strategy, stage=stage)
        try:
            return cls(model_path, placement, workers=resources.rollout.workers,
                       engine={"device": resources.device, **dict(engine or {})},
                       seed=seed, threads=resources.rollout.threads or None, backend=backend, owns_placement=True)
        except BaseException:
            placement.remove()
            raise

    def _parts(self, n: int) -> list[tuple[int, int]]:
        """Contiguous [start, end) ranges of n prompts, one per worker."""
        k = len(self.workers)
        return [(i * n // k, (i + 1) * n // k) for i in range(k)]

    @staticmethod
    def _seeds(prompts: Prompts, sampling: Sampling, seeds: Sequence[int] | None) -> list[int]:
        if seeds is None:
            return [sampling.prompt_seed(i) for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return list(seeds)

    def submit(self, prompts: Prompts, sampling: Sampling, seeds: Sequence[int] | None = None,
               return_routing: bool = False) -> Pending:
        """Start sampling `sampling.k` completions of each prompt, prompt i with seeds[i] (default:
        sampling.prompt_seed(i)); the workers run while the caller goes on."""
        seeds = self._seeds(prompts, sampling, seeds)
        stop = list(sampling.stop) or None
        return Pending([w.generate.remote(list(prompts[a:b]), sampling.k, sampling.temperature, sampling.max_tokens,
                                          seeds[a:b], stop, return_routing, sampling.top_p)
                        for w, (a, b) in zip(self.workers, self._parts(len(prompts))) if b > a])

    def generate(self, prompts: Prompts, sampling: Sampling, seeds: Sequence[int] | None = None,
                 return_routing: bool = False, progress: bool = False) -> list[list[Completion]]:
        """The `sampling.k` completions of each prompt, in prompt order (seeds as `submit`). `progress`: show
        the prompts finished so far (r1pipe.tracking.progress), as they finish."""
        if not progress:
            return self.submit(prompts, sampling, seeds, return_routing).result()
        if return_routing:
            raise ValueError("routing records come from generate without progress")
        groups: list[list[Completion] | None] = [None] * len(prompts)
        with StepProgress(len(prompts), 0, "generate", unit="prompt", transient=True) as bar:
            for finished in self.stream(prompts, sampling, seeds):
                for i, completions in finished:
                    groups[i] = completions
                bar.advance(n=len(finished))
        missing = [i for i, g in enumerate(groups) if g is None]
        if missing:
            raise RuntimeError(f"the rollout workers finished without returning {len(missing)} prompts")
        return groups  # type: ignore[return-value]

    def stream(self, prompts: Prompts, sampling: Sampling,
               seeds: Sequence[int] | None = None) -> Iterator[list[tuple[int, list[Completion]]]]:
        """The samples of `generate`, as prompts finish: each item is every [(prompt index, completions)]
        that the workers have streamed back since the last one (at least one; the first wait blocks). The
        workers keep their continuous batches full meanwhile (RolloutWorker.generate_stream)."""
        seeds = self._seeds(prompts, sampling, seeds)
        stop = list(sampling.stop) or None
        streams = {w.generate_stream.options(num_returns="streaming").remote(
                       list(prompts[a:b]), sampling.k, sampling.temperature, sampling.max_tokens, seeds[a:b], stop,
                       sampling.top_p): a
                   for w, (a, b) in zip(self.workers, self._parts(len(prompts))) if b > a}
        while streams:
            done: list[tuple[int, list[Completion]]] = []
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
                start = streams[ready[0]]
                done.extend((start + i, completions) for i, completions in ray.get(ref))
                timeout = 0  # after the first, only what is already there
            if done:
                yield done

    def on_each(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` run on every worker; their results in worker order."""
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def shutdown(self) -> None:
        """End the workers (and remove the placement group when the group reserved it)."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.owns_placement:
            self.placement.remove()
            self.owns_placement = False
