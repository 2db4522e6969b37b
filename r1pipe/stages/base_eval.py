"""Held-out accuracy of a freshly pre-trained base: a small batched generation loop over the
model's own latent KV cache (greedy or sampled), and exact-match scoring of `<answer>`.

This is the pretrain stage's quick self-check; RL and `r1pipe eval` use r1pipe.engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_tagged_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Completions (token ids, eos excluded) for left-padded prompts; temperature 0 is greedy."""
    from r1pipe.model.cache import DenseLatentCache

    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = True
    positions = torch.where(mask, mask.long().cumsum(1) - 1, torch.full_like(ids, -1))  # -1: padding, never stored
    lengths = mask.sum(1)
    cache = DenseLatentCache(model.config, B, P + max_new_tokens, dtype=next(model.parameters()).dtype)
    logits = model(ids, positions=positions, cache=cache, attention_mask=mask).logits[:, -1]
    out = torch.empty((B, 0), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        pos = (lengths + step)[:, None]
        logits = model(nxt[:, None], positions=pos, cache=cache).logits[:, -1]
    completions = []
    for row in out.tolist():
        completions.append(row[: row.index(eos_id)] if eos_id in row else row)
    return completions


@dataclass
class BaseAccuracy:
    accuracy: float  # share of problems whose <answer> equals the gold answer
    worked_fraction: float  # share of completions that work steps (think is not the bare guess)
    worked_accuracy: float  # accuracy among worked completions (nan if none)
    samples: list[dict]


def measure_accuracy(
    model, tokenizer, rows: list[dict], temperature: float, max_new_tokens: int, batch_size: int = 64, seed: int = 0,
    guess_think: str = "guess",
) -> BaseAccuracy:
    """Accuracy of `model` on problem rows {"prompt", "answer"} with one completion each."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer(r["prompt"]).input_ids for r in chunk]
        outs = generate(model, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature, gen)
        for r, o in zip(chunk, outs):
            text = tokenizer.decode(o)
            pred = extract_tagged_answer(text)
            worked = bool(re.search(r"<think>", text)) and f"<think> {guess_think} </think>" not in text
            samples.append({"id": r["id"], "completion": text, "pred": pred, "answer": r["answer"],
                            "correct": pred == r["answer"], "worked": worked})
    n = max(len(samples), 1)
    worked = [s for s in samples if s["worked"]]
    return BaseAccuracy(
        accuracy=sum(s["correct"] for s in samples) / n,
        worked_fraction=len(worked) / n,
        worked_accuracy=(sum(s["correct"] for s in worked) / len(worked)) if worked else float("nan"),
        samples=samples,
    )
