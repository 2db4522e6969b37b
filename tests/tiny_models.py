"""Tiny models and data built locally for tests (no download): a BPE tokenizer trained on the
synthetic arithmetic corpus, a 2-layer DeepSeek-V3 and a tiny Qwen2 student around it, tokenizer-less
tiny Llama / Qwen2 checkpoints from transformers' own config classes, and worked arithmetic solutions
for supervised fine-tuning."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.causal_lm import init_dense_student
from r1pipe.data.jsonl import write_jsonl
from r1pipe.data.synthetic import completion, corpus_texts, sample_problem
from r1pipe.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from r1pipe.model import ModelConfig, Transformer, save_pretrained


def make_tiny_v3(path: Path, vocab_size: int = 400, **overrides) -> Path:
    """A BPE tokenizer (arithmetic corpus + R1-Zero template) and a random 2-layer V3 beside it."""
    corpus = corpus_texts(1500, 0, ["add", "sub"], 2, 0.25, 0.15, set(), 0.5)
    save_tokenizer(train_tokenizer((p + c for p, c in corpus), vocab_size=vocab_size), path)
    tok = load_tokenizer(path)
    fields = dict(vocab_size=len(tok), num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    save_pretrained(Transformer(dataclasses.replace(ModelConfig.preset("tiny"), **{**fields, **overrides}), seed=0), path)
    return path


def make_tiny_qwen2(path: Path, tokenizer_dir: Path) -> Path:
    return init_dense_student("tiny-qwen2", tokenizer_dir, path, seed=0)


TINY_DENSE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, initializer_range=0.1)


def make_tiny_dense(path: Path, model_type: str = "qwen2", seed: int = 0, **overrides) -> Path:
    """A random tiny transformers Llama / Qwen2 (TINY_DENSE: 2 layers, 4 query and 2 KV heads of 16, vocabulary
    96; `overrides` on top, e.g. tie_word_embeddings or rope_scaling) saved with save_pretrained, no tokenizer
    (prompts are token ids). Weights are drawn with std 0.1 so greedy argmaxes are not near ties."""
    config = AutoConfig.for_model(model_type, **{**TINY_DENSE, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def write_worked_solutions(path: Path, n: int, seed: int = 1) -> Path:
    """{"id", "problem", "solution"} rows: 2-digit add/sub worked column by column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = sample_problem(rng, ["add", "sub"], 2)
        rows.append({"id": i, "problem": p.question, "solution": completion(p, True, rng, 0.0).strip(), "answer": str(p.answer)})
    write_jsonl(path, rows)
    return path
