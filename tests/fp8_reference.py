"""The reference side of the FP8 engine tests, shared by the CPU and the GPU tests (nothing here imports Ray or
omegaconf, which the GPU image lacks): a random tiny V3 with spread-out log-probs, prompts, and greedy or
teacher-forced decoding through the model's own latent cache, one token per forward, no engine code."""
from __future__ import annotations

import dataclasses

import torch

from r1pipe.model import ModelConfig, Transformer
from r1pipe.model.cache import DenseLatentCache
from r1pipe.model.fp8 import FP8_DTYPE

PROMPTS = [[5, 17, 3, 99, 41, 8], [200, 7], [64, 65, 66, 67]]


def fp8_test_model(**overrides) -> Transformer:
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, initializer_range=0.06, **overrides)
    return Transformer(config, seed=11).eval()


@torch.no_grad()
def cached_decode(model: Transformer, prompt: list[int], steps: int, forced: list[int] | None = None
                  ) -> tuple[list[int], list[float]]:
    """The model's own latent-cache decoding, one token per forward (no engine code): greedy, or fed the
    `forced` tokens (teacher forcing). -> (tokens, log_softmax(logits)[token] of each)."""
    steps = len(forced) if forced is not None else steps
    dtype = next(p for p in model.parameters() if p.is_floating_point() and p.dtype != FP8_DTYPE).dtype
    cache = DenseLatentCache(model.config, 1, len(prompt) + steps, dtype=dtype)
    ids, tokens, logps = torch.tensor([prompt]), [], []
    pos = torch.arange(len(prompt))[None]
    for i in range(steps):
        logits = model(ids, positions=pos, cache=cache).logits[0, -1].float()
        tok = int(logits.argmax()) if forced is None else forced[i]
        tokens.append(tok)
        logps.append(float(logits.log_softmax(-1)[tok]))
        ids, pos = torch.tensor([[tok]]), pos[:, -1:] + 1
    return tokens, logps
