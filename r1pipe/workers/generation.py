"""GenerationGroup: N data-parallel RolloutWorker actors (r1pipe.workers.rollout) driven as one, the one way
the project generates: GRPO's rollouts and held-out checks, rejection sampling, the scorecard, the pretrain
stage's base check and `r1pipe eval`.

The workers sit in bundles of a placement group (r1pipe.workers.placement): the stage's own (GRPO reserves one
for its trainers, engines and reward workers) or one the group reserves for itself (`GenerationGroup.reserve`).
Prompts (token ids or texts) are split into contiguous parts, one per engine, and every prompt samples with a
seed of its own, so which engine draws a prompt does not change its samples; results come back in prompt order.
A completion ended by a stop string keeps it, and nothing after it (the engine's include_stop_str_in_output).

An engine is one worker, or with the engine option `ep_size` > 1 that many consecutive workers (expert
parallelism: each holds its share of the routed experts; r1pipe.engine.lockstep): all of them get the engine's
part with the same seeds and generate together, and the first returns the engine's results.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from r1pipe.causal_lm import check_expert_parallel
from r1pipe.errors import ConfigError
from r1pipe.stages.configs import engine_ep_size
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


def gather(refs: list[Any], others: Sequence[Any] = ()) -> list[Any]:
    """ray.get(refs), after `others` (the calls of expert-parallel processes whose results are not used) have
    finished too; the first failure of any is raised at once (the rest of its engine would wait for it)."""
    waiting = list(refs) + list(others)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        ray.get(ready)  # raises a failed call's error
    return ray.get(list(refs))


class Pending:
    """A generation the group has started (`GenerationGroup.submit`); `result()` waits for it."""

    def __init__(self, refs: list[Any], others: Sequence[Any] = ()):
        self.refs = refs  # one Ray reference per engine's part, in prompt order
        self.others = list(others)  # the other processes of expert-parallel engines (their results are [])
        self._done: list[list[Completion]] | None = None

    def result(self) -> list[list[Completion]]:
        """The completions of each prompt, in prompt order."""
        if self._done is None:
            self._done = [group for part in gather(self.refs, self.others) for group in part]
            self.refs, self.others = [], []
        return self._done


class GenerationGroup:
    """`workers` RolloutWorker actors of the checkpoint `model_path`, actor i in bundle i of `role` in
    `placement`: workers / ep_size engines, engine e of actors e * ep_size .. (e + 1) * ep_size - 1, seeded
    `seed + e` (per-prompt seeds decide the samples; see `generate`)."""

    def __init__(self, model_path: str, placement: Placement, *, workers: int, engine: dict[str, Any] | None = None,
                 seed: int = 0, threads: int | None = None, backend: str = "engine", role: str = "rollout",
                 owns_placement: bool = False, key: str = "engine", concurrency: int = 1):
        """`engine`: the engine's options (r1pipe.engine.LLM's, or VLLMEngine's for backend "vllm"; `ep_size`:
        workers per engine); `threads`: torch threads per actor (None: Ray's per-actor default);
        `owns_placement`: `shutdown` removes it; `key`: the recipe section of `engine`, which errors name;
        `concurrency`: calls an actor runs at once (Ray's max_concurrency): 2 lets a worker take weights
        while it generates (GRPO's partial rollouts)."""
        options = dict(engine or {})
        self.ep_size = self.check_engines(model_path, workers, options, backend, key)  # before any actor starts
        actor = ray.remote(RolloutWorker)
        self.placement, self.owns_placement = placement, owns_placement
        self.workers = [actor.options(**placement.options(role, i), max_concurrency=concurrency).remote(
                            str(model_path), options, seed + i // self.ep_size, threads, backend, i % self.ep_size)
                        for i in range(workers)]
        if self.ep_size > 1:  # each engine's actors form its process group, then open the engine on it
            leaders = self.workers[::self.ep_size]
            addresses = ray.get([w.rendezvous_address.remote() for w in leaders])
            gather([w.join_engine.remote(addresses[i // self.ep_size]) for i, w in enumerate(self.workers)])

    @staticmethod
    def check_engines(model_path: str, workers: int, engine: dict[str, Any], backend: str, key: str = "engine") -> int:
        """The workers per engine (engine option ep_size); a ConfigError naming `key`.ep_size when the model, the
        backend, the other options or the number of workers rule it out (reads config.json only)."""
        try:
            ep_size = engine_ep_size(engine, backend, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_expert_parallel(model_path, ep_size, workers, f"{key}.ep_size")
        return ep_size

    @property
    def engines(self) -> list[list[Any]]:
        """The actors of each engine (one each, or ep_size)."""
        return [self.workers[i:i + self.ep_size] for i in range(0, len(self.workers), self.ep_size)]

    @classmethod
    def reserve(cls, model_path: str, resources: SamplingResources, *, key: str = "resources", seed: int = 0,
                engine: dict[str, Any] | None = None, backend: str = "engine", with_reward: bool = True,
                stage: str = "sampling") -> "GenerationGroup":
        """A group in a placement group of its own, made from `resources.rollout` (on `resources.device`) and
        checked, with `resources.reward` when `with_reward` (a RewardPool beside it; not placed in the group),
        against the cluster before any actor starts (r1pipe.workers.placement.reserve); `key` is the recipe
        section that errors name (and its sibling `engine` the engine options' errors). Ray must be initialised
        (r1pipe.workers.cluster.ray_init)."""
        engine_key = key.removesuffix("resources") + "engine"
        cls.check_engines(model_path, resources.rollout.workers, dict(engine or {}), backend, engine_key)
        roles = [role_resources("rollout", resources.rollout, f"{key}.rollout")]
        if with_reward:
            roles.append(role_resources("reward", resources.reward, f"{key}.reward", in_group=False))
        placement = reserve(ResourcePlan(roles), resources.placement_timeout_s, resources.placement_strategy, stage=stage)
        try:
            return cls(model_path, placement, workers=resources.rollout.workers,
                       engine={"device": resources.device, **dict(engine or {})},
                       seed=seed, threads=resources.rollout.threads or None, backend=backend, owns_placement=True,
                       key=engine_key)
        except BaseException:
            placement.remove()
            raise

    def _parts(self, n: int) -> list[tuple[int, int]]:
        """Contiguous [start, end) ranges of n prompts, one per engine."""
        k = len(self.engines)
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
        refs, others = [], []
        for actors, (a, b) in zip(self.engines, self._parts(len(prompts))):
            if b > a:
                calls = [w.generate.remote(list(prompts[a:b]), sampling.k, sampling.temperature, sampling.max_tokens,
                                           seeds[a:b], stop, return_routing, sampling.top_p) for w in actors]
                refs.append(calls[0])
                others += calls[1:]
        return Pending(refs, others)

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
        workers keep their continuous batches full meanwhile (RolloutWorker.generate_stream; the other
        processes of an expert-parallel engine generate along, and only a failure of theirs is read)."""
        seeds = self._seeds(prompts, sampling, seeds)
        stop = list(sampling.stop) or None
        streams, others = {}, set()
        for (leader, *rest), (a, b) in zip(self.engines, self._parts(len(prompts))):
            if b > a:
                part = (list(prompts[a:b]), sampling.k, sampling.temperature, sampling.max_tokens, seeds[a:b], stop)
                streams[leader.generate_stream.options(num_returns="streaming").remote(*part, sampling.top_p)] = a
                others.update(w.generate.remote(*part, False, sampling.top_p) for w in rest)
        while streams:
            done: list[tuple[int, list[Completion]]] = []
            timeout = None
            while streams:
                ready, _ = ray.wait(list(streams) + list(others), num_returns=1, timeout=timeout)
                if not ready:
                    break
                if ready[0] in others:
                    ray.get(ready[0])  # raises a failed process's error
                    others.discard(ready[0])
                    continue
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
        gather([], list(others))

    def on_each(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` run on every worker (an expert-parallel engine's all at once); the results of each
        engine's first worker, in engine order."""
        calls = [[getattr(w, method).remote(*args) for w in actors] for actors in self.engines]
        return gather([c[0] for c in calls], [r for c in calls for r in c[1:]])

    def shutdown(self) -> None:
        """End the workers (and remove the placement group when the group reserved it)."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.owns_placement:
            self.placement.remove()
            self.owns_placement = False
