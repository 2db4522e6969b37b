"""Whether a directory holds a loadable model or tokenizer, checked on the driver before any stage
or Ray actor starts and without importing torch: a missing directory, a missing config.json, missing
or corrupt safetensors weights, or a directory without tokenizer files each get one line naming the
option that pointed there, instead of a traceback from transformers or from inside an actor."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

WEIGHTS_INDEX = "model.safetensors.index.json"
# files one of which a transformers tokenizer directory has (fast, sentencepiece or BPE vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def checkpoint_dir_error(path: str | Path, key: str = "model.path") -> str | None:
    """One line naming `key` when `path` is not a Hugging Face layout checkpoint whose safetensors
    files all open (header and size agree), else None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"{key}={path}: no such directory"
    if not (p / "config.json").is_file():
        return f"{key}={path}: not a Hugging Face layout checkpoint (no config.json)"
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"{key}={path}: config.json is not valid JSON ({e})"
    files = sorted(p.glob("*.safetensors"))
    if (p / WEIGHTS_INDEX).is_file():
        try:
            listed = set(json.loads((p / WEIGHTS_INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{key}={path}: {WEIGHTS_INDEX} is corrupt ({type(e).__name__}: {e})"
        missing = sorted(name for name in listed if not (p / name).is_file())
        if missing:
            return f"{key}={path}: weight files named in {WEIGHTS_INDEX} are missing: {', '.join(missing)}"
    if not files:
        return f"{key}={path}: no *.safetensors weights"
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            return f"{key}={path}: {file.name} is corrupt or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def tokenizer_dir_error(path: str | Path, key: str = "tokenizer") -> str | None:
    """One line naming `key` when `path` is not a directory with tokenizer files, else None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"{key}={path}: no such directory"
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        return f"{key}={path}: no tokenizer files there (expected one of {', '.join(TOKENIZER_FILES)})"
    return None
