"""A byte-level BPE tokenizer trained on a corpus with the `tokenizers` library.

Digits are always single tokens (arithmetic stays aligned); everything between digits is one
pre-token, so BPE can merge a fixed prompt template into a handful of tokens and keep prompts
short. Byte-level fallback means any text (real eval suites too) encodes without unknowns.
Saved as a transformers PreTrainedTokenizerFast; `load_tokenizer` is how every stage, the engine and eval
load a checkpoint's tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1pipe.errors import ModelError
from r1pipe.model_dir import tokenizer_dir_error

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


# tokenizer_config.json classes whose tokenizer is tokenizer.json and nothing else
VERBATIM_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path, key: str = "tokenizer") -> Any:
    """A checkpoint's tokenizer through transformers, tokenizing exactly as it was saved; one without
    a pad token pads with end-of-sequence.

    A tokenizer saved as a plain tokenizers object (r1pipe's own: tokenizer_class TokenizersBackend)
    is loaded from its tokenizer.json as is. AutoTokenizer would instead take the class that
    config.json's model_type names (Qwen2Tokenizer beside a qwen2 student), whose own pre-tokenizer
    splits text differently from the tokenizer that was trained: the corpus template is 10 tokens
    one way and 217 the other. Every other checkpoint (a real Qwen, Llama or DeepSeek tokenizer)
    goes through AutoTokenizer.

    A path that is not a directory with tokenizer files, or files transformers cannot load, is a
    ModelError naming `key` (nothing is looked up on a hub)."""
    error = tokenizer_dir_error(path, key)
    if error:
        raise ModelError(error)
    path = Path(path).expanduser()
    config = path / "tokenizer_config.json"
    try:
        named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
        loader = PreTrainedTokenizerFast if named in VERBATIM_CLASSES else AutoTokenizer
        tokenizer = loader.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{key}={path}: cannot load the tokenizer ({type(e).__name__}: {first})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer: Any) -> str:
    """16 hex digits of sha256 over what the tokenizer does, not where it lies: its `tokenizers` definition
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens) or, for one without that backend, its
    vocabulary; and its bos / eos / pad tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = json.loads(backend.to_str()) if backend is not None else sorted(tokenizer.get_vocab().items())
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")}
    blob = json.dumps({"tokenizer": content, "special": special}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
