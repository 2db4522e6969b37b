"""Which engine generates: r1pipe's own (r1pipe.engine.LLM) or vLLM (r1pipe.engine.vllm_backend.VLLMEngine,
which imports vllm only when built)."""
from __future__ import annotations

from typing import Any

from r1pipe.engine.llm import LLM
from r1pipe.engine.vllm_backend import VLLMEngine
from r1pipe.vocab import ENGINE_BACKENDS


def open_engine(backend: str, model_path: str, seed: int = 0, **engine_kwargs: Any) -> LLM | VLLMEngine:
    """The engine `backend` names ("engine" or "vllm") on the checkpoint at `model_path`; `engine_kwargs` are
    r1pipe engine options (a recipe's `engine:` section), which VLLMEngine translates to vLLM's."""
    if backend == "engine":
        return LLM(model_path, seed=seed, **engine_kwargs)
    if backend == "vllm":
        return VLLMEngine(model_path, seed=seed, **engine_kwargs)
    raise ValueError(f"unknown engine backend {backend!r}; expected one of {', '.join(ENGINE_BACKENDS)}")
