"""RolloutWorker: a generation engine (r1pipe.engine.backend.open_engine: r1pipe's own LLM or vLLM) as a
Ray actor, or one process of an engine that spans several (engine option ep_size: expert parallelism, see
r1pipe.engine.lockstep); r1pipe.workers.generation.GenerationGroup drives several of them as one.

It samples `n` completions per prompt with their per-token log-probs (and, for routing replay,
which needs r1pipe's engine, the experts it chose), and takes new weights from the policy after every step.
Results travel as `Completion` dataclasses, so the controller needs no engine types. A completion
that a stop string ended keeps it (`... </answer>`: the rewards read it) and nothing after it.

As a threaded actor (GenerationGroup's `concurrency` 2: partial rollouts) it takes new weights while a
generation runs: one generation at a time (a second `generate` waits for the first), and weights land
between two engine steps (r1pipe.engine.LLM.step_lock); each completion then records the policy version
of every token (`Completion.token_versions`).
"""
from __future__ import annotations

import bisect
import functools
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from r1pipe.engine import SamplingParams
from r1pipe.engine.backend import open_engine
from r1pipe.errors import ConfigError
from r1pipe.stages.configs import engine_ep_size
from r1pipe.workers.batch import Completion, DraftStats
from r1pipe.workers.shared_memory import SharedBuckets, node_id
from r1pipe.workers.weight_sync import FlatWeights, SyncGroup, rehome, rendezvous_address


def between_engine_steps(method: Callable) -> Callable:
    """A RolloutWorker method that replaces the engine's weights, run with r1pipe's engine's step lock held (so
    a generation in flight in another thread takes them between two of its steps) and followed by
    LLM.weights_changed (each sequence in flight records where they took over); vLLM's run as they are."""

    @functools.wraps(method)
    def wrapped(self: "RolloutWorker", *args: Any, **kwargs: Any) -> Any:
        if self.backend != "engine":
            return method(self, *args, **kwargs)
        with self.llm.step_lock:
            out = method(self, *args, **kwargs)
            self.llm.weights_changed()
            return out

    return wrapped


class RolloutWorker:
    def __init__(self, model_path: str, engine_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 num_threads: int | None = None, backend: str = "engine", ep_rank: int = 0):
        """`num_threads`: torch threads of this actor's process; None (a worker used in the caller's own
        process, e.g. the pretrain stage's base check) leaves the process's setting alone. `backend`: "engine"
        (r1pipe.engine.LLM) or "vllm" (VLLMEngine, which checks its log-prob contract here and raises
        LogprobContractError when vLLM's log-probs are not the ones the trainer assumes). With the engine
        option `ep_size` > 1 this actor is process `ep_rank` of an engine spanning ep_size actors (r1pipe's
        engine only); the engine opens in `join_engine`, once every actor of it exists."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.backend = backend
        kwargs = dict(engine_kwargs or {})
        try:
            self.ep_size, self.ep_rank = engine_ep_size(kwargs, backend), ep_rank
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._engine = (model_path, seed, kwargs)
        self.llm = open_engine(backend, model_path, seed=seed, **kwargs) if self.ep_size == 1 else None  # dtype names parsed there
        self._draft_seen = DraftStats()
        self.flat_weights: FlatWeights | None = None  # the engine's weights laid out as the sync buckets
        self.read_in_place = True  # with shared buckets, read the trainer's weights where they are (no copy)
        self.busy_seconds = 0.0  # time in `generate` since `take_busy_seconds` last asked
        self.generation_lock = threading.Lock()  # held for a whole generate / generate_stream call

    def rendezvous_address(self) -> str:
        """tcp://this-node:free-port, for an expert-parallel engine's process 0 to host its group."""
        return rendezvous_address()

    def join_engine(self, address: str) -> None:
        """Join the engine's process group at `address` as its process ep_rank (every actor of the engine at
        once; this actor's default torch.distributed group, gloo on CPU, NCCL on CUDA) and open the engine on
        it (LLM's ep_size: this rank's share of the routed experts)."""
        model_path, seed, kwargs = self._engine
        device = torch.device(kwargs.get("device", "cpu"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=self.ep_rank,
                                world_size=self.ep_size)
        self.llm = open_engine(self.backend, model_path, seed=seed, **kwargs)

    def generate_stream(self, prompts: list[str] | list[list[int]], n: int, temperature: float, max_tokens: int,
                        seeds: list[int] | None = None, stop: list[str] | None = None,
                        top_p: float = 1.0) -> Iterator[list[tuple[int, list[Completion]]]]:
        """The same samples as `generate`, streamed: after each engine step, the prompts (index, n
        completions) that have just finished. Call as a Ray streaming generator
        (`.options(num_returns="streaming")`): the engine keeps its batch full while the caller scores. An
        expert-parallel engine's processes other than 0 yield nothing."""
        params = self._params(len(prompts), n, temperature, max_tokens, seeds, stop, False, top_p)
        with self.generation_lock:
            for finished in self.llm.iter_generate(prompts, params):
                if self.ep_rank == 0:
                    yield [(i, self._completions(out)) for i, out in finished]

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        n: int,
        temperature: float,
        max_tokens: int,
        seeds: list[int] | None = None,
        stop: list[str] | None = None,
        return_routing: bool = False,
        top_p: float = 1.0,
    ) -> list[list[Completion]]:
        """The n completions of each prompt, in index order; `seeds` (one per prompt) make sampling
        reproducible. Log-probs are of the untruncated distribution whatever `top_p` (GRPO samples with
        top_p 1, evaluation with the R1 protocol's 0.95). An expert-parallel engine's processes other than 0
        take part and return [] (process 0 returns the engine's completions)."""
        params = self._params(len(prompts), n, temperature, max_tokens, seeds, stop, return_routing, top_p)
        with self.generation_lock:
            started = time.perf_counter()
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            self.busy_seconds += time.perf_counter() - started
        return [self._completions(out) for out in outputs] if self.ep_rank == 0 else []

    def take_busy_seconds(self) -> float:
        """Seconds spent in `generate` since the last call (the rest of a step, the engine waited)."""
        busy, self.busy_seconds = self.busy_seconds, 0.0
        return busy

    @staticmethod
    def _params(num_prompts: int, n: int, temperature: float, max_tokens: int, seeds: list[int] | None,
                stop: list[str] | None, return_routing: bool, top_p: float = 1.0) -> list[SamplingParams]:
        """One prompt's sampling settings each: log-probs on, a stop string kept in the text."""
        return [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                               include_stop_str_in_output=True, seed=None if seeds is None else seeds[i], logprobs=True,
                               return_routing=return_routing)
                for i in range(num_prompts)]

    @classmethod
    def _completions(cls, out: Any) -> list[Completion]:
        """A request's completions in sample-index order."""
        return [cls._completion(out, c) for c in sorted(out.outputs, key=lambda c: c.index)]

    @staticmethod
    def _completion(out: Any, c: Any) -> Completion:
        routing = None
        if c.routing is not None and getattr(out, "prompt_routing", None) is not None:
            routing = torch.cat([out.prompt_routing, c.routing], dim=1)
        versions = None
        if c.weight_changes is not None:  # the engine's version at the request's start, plus the changes before each token
            versions = [out.weights_version + bisect.bisect_right(c.weight_changes, j) for j in range(len(c.token_ids))]
        return Completion(prompt_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids), text=c.text,
                          logprobs=list(c.logprobs or []), finish_reason=c.finish_reason, routing=routing,
                          token_versions=versions)

    def take_draft_stats(self) -> DraftStats:
        """MTP drafts proposed and accepted since the last call."""
        if self.backend != "engine":
            raise NotImplementedError("MTP draft counts need r1pipe's own engine (backend: engine)")
        st = self.llm.stats
        now = DraftStats(st["draft_tokens"], st["accepted_tokens"], st["first_drafts"], st["first_accepted"])
        seen, self._draft_seen = self._draft_seen, now
        return now - seen

    @between_engine_steps
    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy these weights into the engine (an engine reading the trainer's shared weights first takes its own
        copy, so the trainer's stay as they are; vLLM loads them with its model's own loader)."""
        if self.backend == "vllm":
            self.llm.update_weights(state_dict)
            return
        if self.flat_weights is not None and self.flat_weights.adopted:
            self.flat_weights = rehome(self.llm.model, self.flat_weights.plan)
        self.llm.update_weights(state_dict)

    def join_sync(self, host: str, port: int, rank: int, world_size: int, buckets: list) -> None:
        """Join the trainer -> engines weight-sync group as receiver `rank` (r1pipe.workers.weight_sync); syncs
        follow `buckets`."""
        self.sync_group = SyncGroup(host, port, rank, world_size, buckets, str(getattr(self.llm, "device", "cpu")))

    def attach_shared_buckets(self, directory: str, read_in_place: bool = True) -> None:
        """Map the trainer's shared-memory buckets (same machine, CPU): later syncs read them in place, or, with
        `read_in_place` False (the trainer trains while this engine generates: asynchronous GRPO), copy them
        (vLLM always copies them into its own weights)."""
        self.sync_group.shared = SharedBuckets(directory, self.sync_group.buckets)
        self.read_in_place = read_in_place

    def node_id(self) -> str:
        """The Ray node this worker runs on."""
        return node_id()

    @between_engine_steps
    def receive_weights(self) -> int:
        """Take one sync of the weights, bucket by bucket, into the engine; returns how many were set. r1pipe's
        engine has its weights laid out as the buckets (weight_sync.rehome, on the first sync), so each bucket
        lands in one piece; with shared buckets they are the buckets, which hold the trainer's weights. vLLM
        takes each bucket's named tensors through VLLMEngine.update_weights (received into this worker's own
        buffers, or read from the shared buckets), and so does a process of an expert-parallel engine that does
        not read the shared buckets in place (LLM.update_weights keeps the experts it holds: its buffers stay
        the size of its own weights)."""
        buckets, shared = self.sync_group.buckets, self.sync_group.shared
        in_place = shared is not None and self.read_in_place
        if self.backend == "vllm" or (self.ep_size > 1 and not in_place):
            return self.sync_group.receive_each(self.llm.update_weights)
        if self.flat_weights is None or not self.flat_weights.fits(buckets):
            self.flat_weights = (rehome(self.llm.model, buckets, into=shared.tensors, adopt=True) if in_place
                                 else rehome(self.llm.model, buckets))
        return self.sync_group.receive_flat(self.flat_weights)

    def set_policy_version(self, version: int) -> None:
        """The policy version of the weights the engine holds now (its count goes on from there at each sync;
        `Completion.token_versions` are in it). Only r1pipe's engine keeps one."""
        if self.backend == "engine":
            with self.llm.step_lock:
                self.llm.weights_version = version

    def pad_token_id(self) -> int:
        """Padding id for training batches (any valid id: padded positions are masked out): the model's pad id,
        else its (first) EOS id, else 0; for either engine family, or vLLM's tokenizer's."""
        if self.backend == "engine":
            return self.llm.family.facts.padding_id
        t = self.llm.tokenizer
        for candidate in (t.pad_token_id, t.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0
