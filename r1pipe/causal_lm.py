"""One handle on the two kinds of causal LM r1pipe trains with supervised losses: its own
DeepSeek-V3 (`model_type: deepseek_v3`, r1pipe.model) and any dense Hugging Face causal LM that
transformers loads (Qwen2, Llama, ...). The checkpoint's config.json says which.

Also the tiny dense students: Qwen2 / Llama configs small enough for a CPU, built locally (no
download) around a given tokenizer, for tests and the distillation recipe.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError, ModelError
from r1pipe.model import ModelConfig, Transformer, load_pretrained, save_pretrained
from r1pipe.model.precision import Precision, apply_precision
from r1pipe.model_dir import tokenizer_dir_error
from r1pipe.vocab import DENSE_PRESETS, PRESETS

V3 = "deepseek_v3"



def model_type_of(path: str | Path) -> str:
    """config.json's model_type; a directory without one is a clear error."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: no config.json (a Hugging Face layout checkpoint directory is expected)")
    model_type = json.loads(config.read_text()).get("model_type")
    if not model_type:
        raise ModelError(f"{config}: no model_type")
    return model_type


@dataclass
class CausalLM:
    """A trainable causal LM of either family, with what a supervised stage needs of it."""

    module: nn.Module
    family: str  # "deepseek_v3" (r1pipe.model) or the Hugging Face model_type
    path: Path
    compute_dtype: torch.dtype = torch.float32  # bf16: autocast over fp32 master weights (V3 does it inside)

    @property
    def is_v3(self) -> bool:
        return self.family == V3

    @property
    def max_length(self) -> int:
        config = self.module.config
        return int(getattr(config, "max_position_embeddings", 0) or 2048)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, mtp: bool = False) -> tuple[Tensor, list[Tensor]]:
        """(logits [B,S,V], MTP logits per module [B,S,V] (r1pipe V3 with mtp=True only)).

        Batches are right-padded, so causal attention never reads padding for a real token and no
        mask is needed for the loss; Hugging Face models still get attention_mask (some use it for
        positions)."""
        if self.is_v3:
            out = self.module(input_ids, mtp=mtp)
            return out.logits, list(out.mtp_logits)
        with torch.autocast(input_ids.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return self.module(input_ids=input_ids, attention_mask=attention_mask).logits.float(), []

    def after_optimizer_step(self) -> None:
        """DeepSeekMoE's aux-loss-free balancing nudges its routing bias after each step."""
        if self.is_v3:
            self.module.update_router_bias()

    def save(self, path: str | Path) -> None:
        """Weights and config in the Hugging Face layout (tokenizer files are the caller's)."""
        if self.is_v3:
            save_pretrained(self.module, path)
        else:
            self.module.save_pretrained(str(path), safe_serialization=True)


def load_causal_lm(path: str | Path, precision: Precision | None = None, device: str = "cpu") -> CausalLM:
    """r1pipe's V3 for deepseek_v3 checkpoints, transformers' AutoModelForCausalLM otherwise; fp32
    master weights, computing as `precision` says (the recipe's model.dtype / fp8 / fp8_exclude)."""
    path = Path(path).expanduser()
    precision = precision or Precision()
    family = model_type_of(path)
    if family == V3:
        module: nn.Module = apply_precision(load_pretrained(path, dtype=torch.float32, device=device), precision)
    else:
        if precision.fp8:
            raise ConfigError(f"model.fp8: FP8 compute is for r1pipe's DeepSeek-V3; {path} is a {family} model "
                             "(train it in model.dtype float32 or bfloat16)")
        module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    return CausalLM(module, family, path, precision.dtype)


def init_model(preset: str, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised model saved with the tokenizer: a dense preset (DENSE_PRESETS) through
    transformers, or an r1pipe DeepSeek-V3 preset (ModelConfig presets) sized to the tokenizer."""
    if preset in DENSE_PRESETS:
        return init_dense_student(preset, tokenizer_dir, out_dir, seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig.preset(preset)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out_dir = Path(out_dir)
    save_pretrained(Transformer(ModelConfig.from_dict(config.to_dict()), seed=seed), out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def dense_config(preset: str, tokenizer: Any, **overrides: Any) -> Any:
    """The transformers config of a dense preset (DENSE_PRESETS) sized to the tokenizer, with overrides."""
    if preset not in DENSE_PRESETS:
        raise ValueError(f"unknown dense student preset {preset!r}; known: {', '.join(DENSE_PRESETS)}")
    fields = {**DENSE_PRESETS[preset], **overrides}
    return AutoConfig.for_model(
        fields.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields,
    )


def init_dense_student(preset: str, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0,
                       **overrides: Any) -> Path:
    """A randomly initialised dense student (DENSE_PRESETS) sized to the tokenizer, saved with it."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = dense_config(preset, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join([*DENSE_PRESETS, *PRESETS])
    parser.add_argument("preset", help=f"a dense Hugging Face preset or an r1pipe DeepSeek-V3 preset: {presets}")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer (its size sets the vocabulary)")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face layout: config, weights, tokenizer)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """`r1pipe model init PRESET --tokenizer DIR --out DIR`: a fresh model to fine-tune (no download)."""
    if args.preset not in DENSE_PRESETS and args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; known: {', '.join([*DENSE_PRESETS, *PRESETS])}")
    error = tokenizer_dir_error(args.tokenizer, "--tokenizer")
    if error:
        raise ModelError(error)
    out = init_model(args.preset, args.tokenizer, args.out, args.seed)
    model = load_causal_lm(out)
    print(f"{out}: {model.family}, {sum(p.numel() for p in model.module.parameters()):,} parameters")
    return 0


__all__ = ["CausalLM", "DENSE_PRESETS", "dense_config", "init_model", "V3", "init_dense_student", "load_causal_lm", "load_tokenizer", "model_type_of"]
