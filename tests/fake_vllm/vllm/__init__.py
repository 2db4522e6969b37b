"""A stand-in for the `vllm` package, for CPU tests of r1pipe.engine.vllm_backend (vllm needs a CUDA GPU and
its own torch). Tests put tests/fake_vllm on sys.path (the `fake_vllm` fixture of tests/conftest.py), Ray
workers through PYTHONPATH.

It has the parts r1pipe uses, shaped as vLLM's: LLM (generate, get_tokenizer, collective_rpc on workers
extended by `worker_extension_cls`, reset_prefix_cache, llm_engine with add_request / step /
has_unfinished_requests / abort_request), SamplingParams, RequestOutput / CompletionOutput / Logprob and
get_tokenizer. LLM takes the engine arguments listed in ENGINE_ARGS and refuses others, as vLLM's EngineArgs
does; collective_rpc carries CPU tensors only, and functions only with VLLM_ALLOW_INSECURE_SERIALIZATION=1.

Outputs are fixed functions of the inputs. The logits after a sequence are a random vector seeded by the
sequence (vocab_size from the checkpoint's config.json, else 32); tokens are drawn from them with a generator
seeded by (the request's seed, else the LLM's, the prompt, the completion's index), greedily at temperature 0.
A token's text is one letter; the tokenizer's EOS (config.json's eos_token_id, else 1) ends a completion
unless ignore_eos. Log-probs follow FAKE_VLLM_LOGPROBS: "contract" (default; what vLLM's
logprobs_mode="processed_logprobs" gives: log_softmax(logits / T) after the request's top-k / top-p mask,
log_softmax(logits) when greedy), "raw" (log_softmax(logits): temperature not applied) or "truncated" (a
hidden top-4 mask on every request, as a model's generation-config default would add).

The model's weights are the checkpoint's names and shapes (its *.safetensors; any name when it has none):
load_weights refuses unknown names and wrong shapes, as vLLM's loaders do, and keeps a copy of each tensor.

Every call is recorded in RECORD as a dict with an "event" key, and appended as a JSON line to the file
FAKE_VLLM_RECORD names (for a vLLM inside a Ray worker).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "get_tokenizer", "RECORD"]

RECORD: list[dict[str, Any]] = []

ENGINE_ARGS = {"logprobs_mode", "worker_extension_cls", "speculative_config", "max_model_len", "max_num_batched_tokens",
               "block_size", "num_gpu_blocks_override", "kv_cache_memory_bytes", "enforce_eager", "quantization",
               "gpu_memory_utilization", "tensor_parallel_size"}
HIDDEN_TOP_K = 4  # the "truncated" mode's mask


def record(event: str, **data: Any) -> None:
    entry = {"event": event, **data}
    RECORD.append(entry)
    path = os.environ.get("FAKE_VLLM_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (dtype and values)."""
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class Tokenizer:
    """Text <-> ids: a token's text is one letter; ids 0 (pad) and `eos_token_id` are special."""

    def __init__(self, vocab_size: int, eos_token_id: int, pad_token_id: int):
        self.vocab_size, self.eos_token_id, self.pad_token_id = vocab_size, eos_token_id, pad_token_id

    def encode(self, text: str) -> list[int]:
        return [2 + ord(ch) % (self.vocab_size - 2) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {self.eos_token_id, self.pad_token_id}
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t in special))


def _config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def get_tokenizer(tokenizer_name: str, **kwargs: Any) -> Tokenizer:
    c = _config(tokenizer_name)
    eos = c.get("eos_token_id")
    return Tokenizer(int(c.get("vocab_size") or 32), 1 if eos is None else int(eos), int(c.get("pad_token_id") or 0))


class Model:
    """The weights: the checkpoint's names and shapes; load_weights as vLLM's model classes have it."""

    def __init__(self, model: str):
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []:
            with safe_open(str(f), "pt") as s:
                self.shapes.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
        self.weights: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: Any) -> set[str]:
        loaded, entries = set(), []
        for name, t in weights:
            if self.shapes and name not in self.shapes:
                raise KeyError(name)
            if self.shapes and tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {self.shapes[name]}")
            self.weights[name] = t.clone()
            loaded.add(name)
            entries.append([name, list(t.shape), str(t.dtype).removeprefix("torch."), tensor_digest(t)])
        record("load_weights", weights=entries)
        return loaded


class Worker:
    def __init__(self, model: str):
        self.model_runner = types.SimpleNamespace(model=Model(model))


def _carried(obj: Any) -> Any:
    """`obj` as collective_rpc delivers it to the workers: tensors copied (CPU ones only), functions only when
    insecure serialization is allowed."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise AssertionError(f"MsgpackEncoder only supports CPU tensors, got {obj.device}")
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        return [_carried(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _carried(v) for k, v in obj.items()}
    if isinstance(obj, types.FunctionType) and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
        raise TypeError("functions cross vLLM's process boundary only with VLLM_ALLOW_INSECURE_SERIALIZATION=1")
    return obj


class Engine:
    """llm_engine: add_request / step / has_unfinished_requests / abort_request. A request finishes after as many
    steps as its longest completion has tokens (FINAL_ONLY: all n completions at once)."""

    def __init__(self, llm: "LLM", logprobs_mode: str):
        self.llm = llm
        self.model_config = types.SimpleNamespace(logprobs_mode=logprobs_mode)
        self.pending: dict[str, list] = {}  # request id -> [steps left, output]

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams) -> None:
        if params.output_kind != RequestOutputKind.FINAL_ONLY:
            raise NotImplementedError("the fake engine returns final outputs only")
        text = prompt if isinstance(prompt, str) else None
        ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
        record("add_request", request_id=request_id, prompt_token_ids=ids,
               params={k: (v.name if isinstance(v, RequestOutputKind) else v) for k, v in dataclasses.asdict(params).items()})
        outputs = [self.llm.complete(ids, params, j) for j in range(params.n)]
        self.pending[request_id] = [max(len(c.token_ids) for c in outputs),
                                    RequestOutput(request_id, text, ids, outputs=outputs, finished=True)]

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[RequestOutput]:
        done = []
        for request_id, entry in list(self.pending.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                done.append(self.pending.pop(request_id)[1])
        return done

    def abort_request(self, request_ids: list[str]) -> None:
        record("abort_request", request_ids=list(request_ids))
        for request_id in request_ids:
            self.pending.pop(request_id, None)


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_num_seqs: int = 256, **kwargs: Any):
        unknown = sorted(set(kwargs) - ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {unknown}")
        record("LLM", model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_num_seqs=max_num_seqs, kwargs=kwargs)
        self.kwargs = dict(kwargs, dtype=dtype, seed=seed, max_num_seqs=max_num_seqs)
        self.seed = seed
        self.request_ids = itertools.count()
        self.tokenizer = get_tokenizer(tokenizer or model)
        self.mode = os.environ.get("FAKE_VLLM_LOGPROBS", "contract")
        worker_cls = Worker
        if kwargs.get("worker_extension_cls"):
            module, _, name = kwargs["worker_extension_cls"].rpartition(".")
            worker_cls = type("ExtendedWorker", (Worker, getattr(importlib.import_module(module), name)), {})
        self.worker = worker_cls(model)
        self.llm_engine = Engine(self, kwargs.get("logprobs_mode", "raw_logprobs"))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[vocab_size] logits after the sequence `ids`."""
        return torch.randn(self.tokenizer.vocab_size, generator=torch.Generator().manual_seed(stable_seed(*ids))) * 2

    def complete(self, prompt: list[int], p: SamplingParams, index: int) -> CompletionOutput:
        """Completion `index` of `prompt` under `p` (see the module docstring)."""
        g = torch.Generator().manual_seed(stable_seed(self.seed if p.seed is None else p.seed, *prompt, "n", index))
        tok = self.tokenizer
        ids: list[int] = []
        steps: list[dict[int, Logprob]] = []
        finish, stop_reason, text = "length", None, ""
        for _ in range(p.max_tokens or 16):
            z = self.logits(prompt + ids)
            scaled = z if p.temperature == 0 else z / p.temperature
            if p.temperature > 0 and p.top_k > 0:
                scaled = scaled.masked_fill(scaled < scaled.topk(p.top_k).values[-1], float("-inf"))
            if p.temperature > 0 and p.top_p < 1:
                order = scaled.softmax(-1).sort(descending=True)
                drop = (order.values.cumsum(-1) - order.values) >= p.top_p
                scaled = scaled.clone()
                scaled[order.indices[drop]] = float("-inf")
            if self.mode == "truncated":
                scaled = scaled.masked_fill(scaled < scaled.topk(HIDDEN_TOP_K).values[-1], float("-inf"))
            t = int(scaled.argmax()) if p.temperature == 0 else int(torch.multinomial(scaled.softmax(-1), 1, generator=g))
            lp = torch.log_softmax(z if self.mode == "raw" else scaled, -1)
            if p.logprobs is not None:
                top = lp.topk(p.logprobs).indices.tolist() if p.logprobs else []
                steps.append({i: Logprob(float(lp[i]), 1 + int((lp > lp[i]).sum()), tok.decode([i], False))
                              for i in top + [t]})
            ids.append(t)
            if t == tok.eos_token_id and not p.ignore_eos:
                finish = "stop"
                break
            if p.stop_token_ids and t in p.stop_token_ids:
                finish, stop_reason = "stop", t
                break
            text = tok.decode(ids, p.skip_special_tokens)
            hit = [(text.find(s), s) for s in p.stop or [] if s in text]
            if hit:  # the text stops before the stop string; the token that completed it stays
                at, s = min(hit)
                finish, stop_reason, text = "stop", s, text[:at + len(s) if p.include_stop_str_in_output else at]
                break
        if not isinstance(stop_reason, str):
            text = tok.decode(ids, p.skip_special_tokens)
        return CompletionOutput(index, text, ids, None, steps if p.logprobs is not None else None, finish, stop_reason)

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params or SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = []
        for prompt, p in zip(prompts, plist):
            p.output_kind = RequestOutputKind.FINAL_ONLY
            ids.append(f"generate-{next(self.request_ids)}")
            self.llm_engine.add_request(ids[-1], prompt, p)
        done: dict[str, RequestOutput] = {}
        while self.llm_engine.has_unfinished_requests():
            done.update((r.request_id, r) for r in self.llm_engine.step())
        return [done[i] for i in ids]

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        record("collective_rpc", method=method if isinstance(method, str) else getattr(method, "__name__", str(method)))
        args, kwargs = _carried(list(args)), _carried(dict(kwargs or {}))
        fn = getattr(self.worker, method) if isinstance(method, str) else _carried(method).__get__(self.worker)
        return [fn(*args, **kwargs)]

    def reset_prefix_cache(self) -> bool:
        record("reset_prefix_cache")
        return True
