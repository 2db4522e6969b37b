"""Batched sampling: temperature, top-k, top-p, log-probs and inverse-CDF draws from seeded streams.

Every sequence owns a torch.Generator (seeded from its request seed or from the engine's seed), so a
completion depends only on its seed, never on what else shares the batch. Draws are uniforms in
[0, 1) turned into tokens by inverse CDF, which lets the speculative verifier reuse the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1pipe.algo.logprobs import tempered_logits, token_logprobs as tempered_token_logprobs

_CHUNK = 64  # uniforms drawn per generator call; fixed, so a stream never depends on batching


class RandomStream:
    """A sequence's private stream of uniforms in [0, 1)."""

    __slots__ = ("generator", "_buffer", "_pos")

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._buffer: list[float] = []
        self._pos = 0

    def next(self) -> float:
        if self._pos == len(self._buffer):
            self._buffer = torch.rand(_CHUNK, generator=self.generator, dtype=torch.float64).tolist()
            self._pos = 0
        self._pos += 1
        return self._buffer[self._pos - 1]


def uniforms(streams: list[RandomStream], count: int = 1) -> torch.Tensor:
    """[len(streams), count] float64 uniforms, row i from streams[i]."""
    if count == 1:
        return torch.tensor([s.next() for s in streams], dtype=torch.float64).unsqueeze(1)
    return torch.tensor([[s.next() for _ in range(count)] for s in streams], dtype=torch.float64)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one batch (temperature 0 = greedy)."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, vocab size when off
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    any_greedy: bool
    any_top_p: bool
    any_top_k: bool
    shared_temperature: float | None = None  # the temperature logits are divided by, when one for every row

    @property
    def divisor(self) -> float | torch.Tensor:
        """What logits are divided by: T per row [B, 1] (1 for greedy rows), or one float for all rows."""
        if self.shared_temperature is not None:
            return self.shared_temperature
        return torch.where(self.greedy, torch.ones_like(self.temperature), self.temperature).unsqueeze(-1)

    @staticmethod
    def build(temperature: list[float], top_p: list[float], top_k: list[int], vocab_size: int,
              device: torch.device | str = "cpu") -> "SamplingTensors":
        t = torch.tensor(temperature, dtype=torch.float32, device=device)
        k = torch.tensor([vocab_size if x < 0 else min(x, vocab_size) for x in top_k], device=device)
        greedy = t == 0
        return SamplingTensors(
            temperature=t, top_p=torch.tensor(top_p, dtype=torch.float32, device=device), top_k=k,
            greedy=greedy, all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
            any_top_p=any(p < 1.0 for p in top_p), any_top_k=any(0 < x < vocab_size for x in top_k))

    @staticmethod
    def uniform(n: int, temperature: float, top_p: float, top_k: int, vocab_size: int,
                device: torch.device | str = "cpu") -> "SamplingTensors":
        """n rows that all sample with the same settings: what `build` gives for n equal entries."""
        k = vocab_size if top_k < 0 else min(top_k, vocab_size)
        greedy = temperature == 0
        return SamplingTensors(
            temperature=torch.full((n,), temperature, dtype=torch.float32, device=device),
            top_p=torch.full((n,), top_p, dtype=torch.float32, device=device),
            top_k=torch.full((n,), k, dtype=torch.long, device=device),
            greedy=torch.full((n,), greedy, dtype=torch.bool, device=device), all_greedy=greedy or n == 0,
            any_greedy=greedy and n > 0, any_top_p=top_p < 1.0 and n > 0, any_top_k=0 < top_k < vocab_size and n > 0,
            shared_temperature=1.0 if greedy else float(temperature))

    def select(self, rows: torch.Tensor) -> "SamplingTensors":
        """The parameters of the given rows (e.g. one row per draft position)."""
        return SamplingTensors(self.temperature[rows], self.top_p[rows], self.top_k[rows], self.greedy[rows],
                               self.all_greedy, self.any_greedy, self.any_top_p, self.any_top_k, self.shared_temperature)


def scaled_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits / T per row, T = 1 for greedy rows (the temperature the log-probs are taken at); float32."""
    return tempered_logits(logits, st.divisor)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """log_softmax(logits / T)[token] per row: [B, V], [B] -> [B]."""
    return tempered_token_logprobs(logits, tokens, st.divisor)


def sampling_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The distribution each row actually samples from: softmax of logits / T after top-k and top-p;
    one-hot at the argmax for greedy rows. [B, V] -> [B, V] float32."""
    scaled = scaled_logits(logits, st)
    if st.any_top_k or st.any_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        drop = rank.unsqueeze(0) >= st.top_k.unsqueeze(-1)
        if st.any_top_p:
            sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the token crossing it stays)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            drop |= mass_before >= st.top_p.unsqueeze(-1)
        drop = drop.scatter(-1, order, drop)  # back to vocabulary order
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if st.any_greedy:
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(st.greedy.unsqueeze(-1), onehot, probs)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative mass exceeds u * total. [B, V], [B] -> [B]."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, st: SamplingTensors, streams: list[RandomStream]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, a seeded draw otherwise. [B, V] -> [B] int64."""
    if st.all_greedy:
        return logits.argmax(-1)
    u = uniforms(streams).squeeze(-1).to(logits.device)
    tokens = draw(sampling_probs(logits, st), u)
    return torch.where(st.greedy, logits.argmax(-1), tokens) if st.any_greedy else tokens
