"""The two kinds of causal LM r1pipe trains, behind one set of functions: its own DeepSeek-V3
(`model_type: deepseek_v3`, r1pipe.model) and any dense Hugging Face causal LM that transformers
loads (Qwen2, Llama, ...). The checkpoint's config.json says which; the module is used as it is
(its state dict keys are the Hugging Face ones), and these functions load, run and save either.

Also the tiny dense students: Qwen2 / Llama configs small enough for a CPU, built locally (no
download) around a given tokenizer, for tests and the distillation recipe.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError, ModelError
from r1pipe.model import ModelConfig, ModelOutput, Transformer, load_pretrained, save_pretrained
from r1pipe.model.expert_parallel import check_ep_size
from r1pipe.model.precision import Precision, apply_precision
from r1pipe.model.transformer import right_padded
from r1pipe.model_dir import tokenizer_dir_error
from r1pipe.vocab import DENSE_PRESETS, PRESETS

V3 = "deepseek_v3"



def model_config(path: str | Path) -> dict:
    """The checkpoint's config.json; a directory without one is a clear error."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: no config.json (a Hugging Face layout checkpoint directory is expected)")
    return json.loads(config.read_text())


def check_expert_parallel(path: str | Path, ep_size: int, workers: int, key: str) -> None:
    """On the driver, before any actor starts: ep_size > 1 needs r1pipe's DeepSeek-V3 (routed experts to split)
    with n_routed_experts and `workers` both multiples of ep_size; a ConfigError naming `key` and the numbers."""
    if ep_size == 1:
        return
    config = model_config(path)
    if config.get("model_type") != V3:
        raise ConfigError(f"{key}={ep_size}: expert parallelism splits r1pipe DeepSeek-V3's routed experts; {path} is "
                          f"a {config.get('model_type')} model (set {key}: 1)")
    try:
        check_ep_size(ep_size, int(config.get("n_routed_experts") or 0), workers, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_type_of(path: str | Path) -> str:
    """config.json's model_type."""
    model_type = model_config(path).get("model_type")
    if not model_type:
        raise ModelError(f"{Path(path) / 'config.json'}: no model_type")
    return model_type


def context_length(path: str | Path) -> int:
    """The longest sequence the checkpoint's model takes (max_position_embeddings; 2048 without one)."""
    return int(model_config(path).get("max_position_embeddings") or 2048)


def is_v3(module: nn.Module) -> bool:
    """Whether `module` is r1pipe's DeepSeek-V3 (else a transformers causal LM)."""
    return isinstance(module, Transformer)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in over its fp32 masters (the recipe's model.dtype)."""
    return getattr(module, "compute_dtype", torch.float32)


def run_model(module: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, mtp: bool = False,
              **v3_options: Any) -> ModelOutput:
    """One forward of either family as r1pipe's ModelOutput (logits [B,S,V] float32; MTP logits for V3 with
    mtp=True; `v3_options`: positions, prefix, routing for r1pipe's V3). Batches are right-padded, so causal
    attention never reads padding for a real token; a transformers model computes under autocast in its
    compute dtype (r1pipe's V3 does that inside)."""
    if is_v3(module):
        return module(input_ids, attention_mask=attention_mask, mtp=mtp, **v3_options)
    if v3_options or mtp:
        raise ValueError(f"{type(module).__name__}: packed prompts, routing replay and MTP are r1pipe V3 features")
    dtype = compute_dtype(module)
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        # right padding under causal attention needs no mask (and takes the causal kernels); other padding does
        mask = None if attention_mask is None or right_padded(attention_mask) else attention_mask
        logits = module(input_ids=input_ids, attention_mask=mask).logits
    return ModelOutput(logits=logits.float(), hidden=None)  # type: ignore[arg-type]


def save_model(module: nn.Module, path: str | Path) -> None:
    """Weights and config in the Hugging Face layout (tokenizer files are the caller's)."""
    if is_v3(module):
        save_pretrained(module, path)
    else:
        module.save_pretrained(str(path), safe_serialization=True)


def load_model(path: str | Path, precision: Precision | None = None, device: str = "cpu") -> nn.Module:
    """r1pipe's V3 for deepseek_v3 checkpoints, transformers' AutoModelForCausalLM otherwise; fp32 master
    weights, computing as `precision` says (the recipe's model.dtype / fp8 / fp8_exclude)."""
    path = Path(path).expanduser()
    precision = precision or Precision()
    family = model_type_of(path)
    if family == V3:
        return apply_precision(load_pretrained(path, dtype=torch.float32, device=device), precision)
    if precision.fp8:
        raise ConfigError(f"model.fp8: FP8 compute is for r1pipe's DeepSeek-V3; {path} is a {family} model "
                         "(train it in model.dtype float32 or bfloat16)")
    module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    module.compute_dtype = precision.dtype
    return module


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
    model = load_model(out)
    print(f"{out}: {model_type_of(out)}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


__all__ = ["DENSE_PRESETS", "V3", "compute_dtype", "context_length", "model_config", "dense_config", "init_dense_student", "init_model", "is_v3", "load_model",
           "load_tokenizer", "model_type_of", "run_model", "save_model"]
