"""Training fidelity of FP8: the tiny model trained with and without FP8 on the same synthetic corpus.

python bench/bench_fp8_training.py [--steps 300] [--batch 16] [--seq 64] [--device cpu|cuda]
Both runs start from the same weights and see the same batches; the figure is the relative gap of the
final loss (mean of the last 20 steps): |fp8 - fp32| / fp32 (goal < 1%; DeepSeek reports < 0.25% at scale).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from tqdm import tqdm

from r1pipe.model import ModelConfig, Transformer, lm_loss


def synthetic_batches(vocab: int, batch: int, seq: int, steps: int, seed: int) -> list[torch.Tensor]:
    """A fixed random Markov chain: each token has 4 equally likely successors (best loss ln 4 = 1.386)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    batches = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        batches.append(ids)
    return batches


def train(config: ModelConfig, batches: list[torch.Tensor], device: str, lr: float, label: str) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(config, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for ids in tqdm(batches, desc=label, leave=False):
        loss, _ = lm_loss(model(ids.to(device)), ids.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_router_bias()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    base = ModelConfig.preset("tiny")
    batches = synthetic_batches(base.vocab_size, args.batch, args.seq, args.steps, seed=1)
    curves = {name: train(dataclasses.replace(base, fp8=fp8), batches, args.device, args.lr, name)
              for name, fp8 in (("fp32", False), ("fp8", True))}
    tail = {name: sum(c[-20:]) / len(c[-20:]) for name, c in curves.items()}
    gap = abs(tail["fp8"] - tail["fp32"]) / tail["fp32"]
    for step in sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1}):
        print(f"step {step:5d}  fp32 {curves['fp32'][step]:.4f}  fp8 {curves['fp8'][step]:.4f}")
    print(f"final loss (mean of last 20 steps): fp32 {tail['fp32']:.4f}  fp8 {tail['fp8']:.4f}  "
          f"relative gap {gap:.3%} (goal < 1%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curves": curves, "final": tail, "relative_gap": gap}, f)


if __name__ == "__main__":
    main()
