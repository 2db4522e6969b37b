"""A byte-level BPE tokenizer trained on a corpus with the `tokenizers` library.

Digits are always single tokens (arithmetic stays aligned); everything between digits is one
pre-token, so BPE can merge a fixed prompt template into a handful of tokens and keep prompts
short. Byte-level fallback means any text (real eval suites too) encodes without unknowns.
Saved as a transformers PreTrainedTokenizerFast so `AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, EOS, BOS = "<|pad|>", "<|eos|>", "<|bos|>"
SPECIAL_TOKENS = [PAD, EOS, BOS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
    """Train the BPE on `texts`; ids 0, 1, 2 are pad, eos, bos. The vocabulary may end up smaller
    than vocab_size when the corpus has fewer frequent pairs."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path, model_max_length: int = 4096) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (transformers layout)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS, model_max_length=model_max_length
    )
    fast.save_pretrained(str(path))


def load_tokenizer(path: str | Path):
    """The saved tokenizer through transformers (what the engine and eval use)."""
    return AutoTokenizer.from_pretrained(str(path))
