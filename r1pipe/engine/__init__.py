"""r1pipe's rollout engine: continuous-batched generation on its own DeepSeek-V3 with a paged latent cache,
seeded sampling, routing records, MTP self-speculation and hot weight updates (API shaped like vLLM's)."""
from r1pipe.engine.llm import LLM
from r1pipe.engine.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
