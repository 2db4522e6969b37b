"""r1pipe's rollout engine: continuous-batched generation over a paged KV cache on its own DeepSeek-V3 (latent
cache, routing records, MTP self-speculation, FP8) or a dense transformers Llama / Qwen2, with seeded sampling,
log-probs and hot weight updates (API shaped like vLLM's). `check_supported(path)` says from config.json alone
whether the engine runs a checkpoint."""
from r1pipe.engine.families import SUPPORTED_MODEL_TYPES, check_supported
from r1pipe.engine.llm import LLM
from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "SUPPORTED_MODEL_TYPES", "check_supported"]
