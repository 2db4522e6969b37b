"""Generation backends for evaluation: r1pipe checkpoints through r1pipe.engine, dense Hugging Face
models through transformers, and vLLM when it is installed (r1pipe.engine.vllm_backend, imported lazily,
GPU only; the same engine-shaped wrapper as r1pipe's own engine).

Every backend turns a list of prompt strings into k completions per prompt, with the R1 protocol's
sampling (temperature, top-p) or greedy decoding (temperature 0), cut at the template's stop
strings (the stop string is kept, so `</answer>` closes the R1-Zero answer).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from transformers import AutoModelForCausalLM

from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.engine import LLM, SamplingParams
from r1pipe.engine.vllm_backend import VLLMEngine
from r1pipe.tracking.progress import StepProgress

BACKENDS = ("auto", "engine", "hf", "vllm")
ENGINE_ONLY = {"max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size", "num_blocks", "speculative_k", "cache_memory_gb"}


@dataclass(frozen=True)
class GenerationConfig:
    n: int = 1  # samples per prompt
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.95
    max_tokens: int = 4096
    seed: int = 0


class Backend(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompts: list[str], stop: Sequence[str], config: GenerationConfig) -> list[list[str]]:
        """config.n completions for each prompt, in prompt order."""
        ...


def close_stop(text: str, finish_reason: str | None, stop: Sequence[str]) -> str:
    """Engines drop the stop string from the text (as vLLM does); put it back when it ended the
    sample, so an R1-Zero answer reads `<answer> 42 </answer>`."""
    if finish_reason != "stop" or "</answer>" not in stop or text.endswith("</answer>"):
        return text
    # Closed only when an answer is open: a sample that ended on EOS elsewhere stays as it was.
    return text + "</answer>" if "<answer>" in text.rsplit("</answer>", 1)[-1] else text


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to and including the first stop string."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


class EngineBackend:
    """An engine with r1pipe.engine.LLM's interface: r1pipe's own (latent KV cache, paged batching; r1pipe
    checkpoints or a live model) or vLLM's (r1pipe.engine.vllm_backend.VLLMEngine)."""

    def __init__(self, llm: Any, name: str = "engine"):
        self.llm, self.name = llm, name
        self.tokenizer = llm.tokenizer

    @staticmethod
    def own(model: Any, tokenizer: Any = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
            seed: int = 0, **engine_options: Any) -> "EngineBackend":
        return EngineBackend(LLM(model, tokenizer=tokenizer, dtype=dtype, device=device, seed=seed, **engine_options))

    @staticmethod
    def vllm(path: str | Path, *, seed: int = 0, **vllm_options: Any) -> "EngineBackend":
        return EngineBackend(VLLMEngine(path, seed=seed, **vllm_options), name="vllm")

    def generate(self, prompts: list[str], stop: Sequence[str], config: GenerationConfig) -> list[list[str]]:
        params = SamplingParams(
            n=config.n, temperature=config.temperature, top_p=config.top_p if config.temperature > 0 else 1.0,
            max_tokens=config.max_tokens, stop=list(stop) or None, seed=config.seed,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [[close_stop(o.text, o.finish_reason, stop) for o in out.outputs] for out in outputs]


class HFBackend:
    """Dense Hugging Face causal LMs (Qwen2, Llama, distilled students) through transformers."""

    name = "hf"

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8):
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(self, prompts: list[str], stop: Sequence[str], config: GenerationConfig) -> list[list[str]]:
        sampling = config.temperature > 0
        options: dict[str, Any] = dict(
            max_new_tokens=config.max_tokens, do_sample=sampling, num_return_sequences=config.n,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sampling:
            options.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        results: list[list[str]] = []
        # transformers samples from torch's global generator: seed a forked copy, restore after.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            progress = StepProgress(len(prompts), 0, "generating (hf)", unit="prompt", transient=True).start()
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                encoded = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                generated = self.model.generate(**encoded, **options)
                new_tokens = generated[:, encoded["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i in range(len(batch)):
                    results.append([cut_at_stop(t, stop) for t in texts[i * config.n : (i + 1) * config.n]])
                progress.advance(n=len(batch))
            progress.stop()
        return results


def model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


def vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def load_backend(model: Any, backend: str = "auto", *, tokenizer: Any = None, device: str | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0, **options: Any) -> Backend:
    """A backend for `model`: a Backend (used as is), a live r1pipe model (engine), or a checkpoint
    directory. 'auto' picks the engine for deepseek_v3 checkpoints (r1pipe's own), vLLM for other
    models when it is installed and a GPU is present, else transformers."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if hasattr(model, "generate") and hasattr(model, "tokenizer") and not isinstance(model, torch.nn.Module):
        return model  # already a backend
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, torch.nn.Module):
        return EngineBackend.own(model, tokenizer, device=device, dtype=dtype, seed=seed, **options)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (a checkpoint directory is expected; nothing is downloaded)")
    if backend == "auto":
        if model_type(path) == "deepseek_v3":
            backend = "engine"
        else:
            backend = "vllm" if vllm_usable() else "hf"
    if backend == "engine":
        return EngineBackend.own(path, tokenizer, device=device, dtype=dtype, seed=seed, **options)
    # Engine sizing options: vLLM shares two of them by name; transformers needs none.
    if backend == "vllm":
        return EngineBackend.vllm(path, seed=seed, **{k: v for k, v in options.items()
                                                                 if k in ("max_num_seqs", "max_model_len", "speculative_k")
                                                                 or k not in ENGINE_ONLY})
    return HFBackend(path, device=device, dtype=dtype, **{k: v for k, v in options.items() if k not in ENGINE_ONLY})
