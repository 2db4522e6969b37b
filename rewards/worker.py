"""Ray actors that score batches of completions in parallel: `RewardPool(weights, num_workers)`.

Each `RewardWorker` owns one RewardFn (and its own math-verify processes); inside a worker, rewards
run on a thread pool: a code sandbox mostly waits on the kernel setting up its namespaces and on its
child process, so a few at once overlap well. A pool worker runs as many threads as the machine has
cores, at most 8 (`default_threads`): more concurrent sandboxes than cores cost CPU in the kernel
(namespace set-up and teardown) that generation then lacks. On 2 cores, rejection sampling with 25%
code prompts ran at 0.78x the raw engine with 8 threads and 0.95x with 2; scoring alone got faster too.

Pool workers score in the background: niced on top of Ray's own worker niceness (19 at most), their
scoring threads and every sandboxed program under SCHED_IDLE, in the worker's own session (see
rewards.sandbox on sessions and autogroups), math-verify processes started with the worker. Rewards
overlap generation, and where the two compete for cores the engine, the bottleneck, goes first.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from .compose import RewardResult, build_reward_fn
from .sandbox import release_terminal
from .verifier import default_pool


def _idle() -> None:
    """This thread (and what it starts) runs only on CPU time nothing else wants (SCHED_IDLE)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class RewardWorker:
    """Plain class; `RewardPool` wraps it with `ray.remote`. Usable directly in tests or one process."""

    def __init__(self, weights: dict[str, float], threads: int = 8, nice: int = 0, **options):
        """`nice` > 0 makes this a background scorer (RewardPool's actors: 10): the process lowers its priority
        by `nice`, its scoring threads (and the sandboxed programs they start) run under SCHED_IDLE, it gives up
        its controlling terminal so that those programs need no session of their own (rewards.sandbox), and it
        starts its math-verify processes at once instead of at the first answer that needs one."""
        self.reward_fn = build_reward_fn(weights, **options)
        self.threads = threads
        self.background = nice > 0
        if self.background:
            os.nice(nice)
            release_terminal()
            if "accuracy" in weights:
                default_pool().start()

    def score(self, completions: list[str], references: list[dict]) -> list[RewardResult]:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        if self.threads <= 1 or len(completions) <= 1:
            return [self.reward_fn(c, r) for c, r in zip(completions, references)]
        with ThreadPoolExecutor(self.threads, initializer=_idle if self.background else None) as ex:
            return list(ex.map(self.reward_fn, completions, references))


def default_threads() -> int:
    """Scoring threads of a pool worker: the cores this process may run on, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class RewardPool:
    """Scores a batch across `num_workers` Ray actors (contiguous chunks, order preserved)."""

    def __init__(self, weights: dict[str, float], num_workers: int = 2, num_cpus_per_worker: float = 1.0,
                 threads_per_worker: int | None = None, nice: int = 10, resources: dict[str, float] | None = None,
                 **options):
        """`threads_per_worker` None: default_threads(); `resources`: custom Ray resources per worker."""
        import ray  # lazily: rewards work without Ray

        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        build_reward_fn(weights, **options)  # a bad weight or option fails here, in the caller
        if not ray.is_initialized():
            ray.init(num_cpus=max(num_workers, 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actor = ray.remote(num_cpus=num_cpus_per_worker, resources=dict(resources or {}) or None)(RewardWorker)
        self._ray = ray
        threads = threads_per_worker or default_threads()
        self.workers = [actor.remote(weights, threads, nice, **options) for _ in range(num_workers)]

    def score(self, completions: list[str], references: list[dict]) -> list[RewardResult]:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        n = len(completions)
        if n == 0:
            return []
        k = len(self.workers)
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        futures = [w.score.remote(completions[a:b], references[a:b]) for w, (a, b) in zip(self.workers, bounds) if b > a]
        return [r for chunk in self._ray.get(futures) for r in chunk]

    def shutdown(self) -> None:
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []
