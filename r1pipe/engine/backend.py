"""Which engine generates: r1pipe's own (`engine`, r1pipe.engine.LLM) or vLLM's (`vllm`,
r1pipe.engine.vllm_backend.VLLMEngine, which imports vllm only when it is built)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r1pipe.engine.llm import LLM
from r1pipe.engine.vllm_backend import VLLMEngine
from r1pipe.vocab import ENGINE_BACKENDS as BACKENDS


def open_engine(backend: str, model_path: str | Path, seed: int = 0, **engine_kwargs: Any) -> LLM | VLLMEngine:
    """The `backend` engine for the checkpoint at `model_path`, built with `engine_kwargs`."""
    if backend == "engine":
        return LLM(model_path, seed=seed, **engine_kwargs)
    if backend == "vllm":
        return VLLMEngine(model_path, seed=seed, **engine_kwargs)
    raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
