"""One small interface over the tokenizers the engine may be given (transformers or `tokenizers`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from r1pipe.data.tokenizer import load_tokenizer


class TokenizerAdapter:
    """encode / decode / eos_token_id over a transformers tokenizer or a tokenizers.Tokenizer."""

    def __init__(self, tokenizer: Any, eos_token_id: int | list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self._is_raw = hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "batch_decode")
        own_eos = None if self._is_raw else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id: int | list[int] | None = own_eos if own_eos is not None else eos_token_id
        self._token_texts: list[str] | None = None  # token_texts(), built on first use

    @staticmethod
    def load(source: Any, eos_token_id: int | list[int] | None = None) -> "TokenizerAdapter | None":
        """A tokenizer from a directory (r1pipe.data.tokenizer.load_tokenizer, or a bare tokenizer.json) or an
        object; None when a directory holds no tokenizer files."""
        if source is None:
            return None
        if isinstance(source, TokenizerAdapter):
            return source
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
                return None
            try:
                return TokenizerAdapter(load_tokenizer(path), eos_token_id)
            except (OSError, ValueError, KeyError):
                return TokenizerAdapter(Tokenizer.from_file(str(path / "tokenizer.json")), eos_token_id)
        return TokenizerAdapter(source, eos_token_id)

    def encode(self, text: str) -> list[int]:
        if self._is_raw:
            return list(self.tokenizer.encode(text).ids)
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self) -> list[str]:
        """Every id's own text (decoded alone, special tokens included), computed once."""
        if self._token_texts is None:
            singles = [[i] for i in range(self.vocab_size)]
            if self._is_raw:
                self._token_texts = list(self.tokenizer.decode_batch(singles, skip_special_tokens=False))
            else:
                self._token_texts = list(self.tokenizer.batch_decode(singles, skip_special_tokens=False))
        return self._token_texts

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included."""
        if self._is_raw:
            return self.tokenizer.get_vocab_size(with_added_tokens=True)
        return len(self.tokenizer)
