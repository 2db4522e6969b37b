"""One GRPO step in one process, without Ray: a PolicyWorker (the trainer) and the rollout engine (r1pipe.engine.LLM)
on the same device, split by phase: rollout (the engine samples `--group` completions of each prompt), reward,
train (one PolicyWorker.train_step with the engine's log-probs: TIS at cap 2 and the trainer/engine mismatch),
sync (the trainer's weights copied into the engine with LLM.update_weights: quantized on the way in with --fp8).

The model is a random DeepSeek-V3 of bench_engine's shapes (`--shape 1.7b`: ~1.75 B parameters); prompts are
random token ids and every completion runs to --max-tokens (ignore_eos); the reward is a fixed function of the
tokens (the share of completion tokens in the lower half of the vocabulary), so groups differ and advantages
are not zero. The first step warms up (kernel selection, CUDA graph captures); figures are the median of the
others. The last line is all figures as JSON.

  python bench/bench_grpo_step.py                                  # CPU, tiny shape
  python bench/bench_grpo_step.py --device cuda --shape 1.7b --prompts 32 --group 8 --max-tokens 128
  python bench/bench_grpo_step.py --device cuda --shape 1.7b --fp8 # FP8 rollouts (rl.rollout.engine.fp8)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench_engine import model_config
from r1pipe.algo import group_advantages
from r1pipe.engine import LLM, SamplingParams
from r1pipe.model import Precision, Transformer, save_pretrained
from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch, pad_per_token


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", default="tiny", choices=("tiny", "1.7b"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps, the first a warm-up")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="trainer compute dtype and engine dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--fp8", action="store_true", help="FP8 rollouts (the engine's projections in FP8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first one warms up)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    config = model_config(args.shape)
    vocab = config.vocab_size
    rows = args.prompts * args.group
    with tempfile.TemporaryDirectory() as path:
        with torch.device(device):
            save_pretrained(Transformer(config, seed=args.seed).to(getattr(torch, dtype)), path)
        policy = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-6, micro_batch_size=args.micro_batch, device=args.device,
                                                       num_threads=args.threads, precision=Precision.from_section(
                                                           {"dtype": dtype})))
        engine = LLM(path, dtype=dtype, device=device, max_num_seqs=rows, fp8=args.fp8,
                     max_model_len=args.prompt_len + args.max_tokens + 8,
                     cache_memory_gb=8.0 if device.type == "cuda" else 0.5)
    g = torch.Generator().manual_seed(args.seed)
    steps = []
    for step in range(args.steps):
        prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
        times = {}
        sync(device)
        t = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(n=args.group, temperature=1.0, max_tokens=args.max_tokens,
                                                       seed=args.seed + step, ignore_eos=True), use_tqdm=False)
        sync(device)
        times["rollout"] = time.perf_counter() - t
        t = time.perf_counter()
        completions = [c for o in outs for c in o.outputs]
        rewards = torch.tensor([sum(tok < vocab // 2 for tok in c.token_ids) / len(c.token_ids) for c in completions])
        advantages = group_advantages(rewards, args.group)
        times["reward"] = time.perf_counter() - t
        t = time.perf_counter()
        prompt_rows = [o.prompt_token_ids for o in outs for _ in o.outputs]
        batch = build_batch(prompt_rows, [c.token_ids for c in completions], pad_id=0)
        shape = (rows, batch.input_ids.shape[1] - 1)
        engine_logp = pad_per_token([c.logprobs for c in completions], [len(p) for p in prompt_rows], shape)
        tokens = float(batch.response_mask.sum())
        stats = policy.train_step(batch, None, advantages, None, tokens, float(rows), engine_logp=engine_logp,
                                  tis_cap=2.0)
        sync(device)
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.update_weights(policy.model.state_dict())
        sync(device)
        times["sync"] = time.perf_counter() - t
        times["step"] = sum(times.values())
        times["mismatch_mean_abs"] = stats["mismatch_abs"] / tokens
        times["tis_clipped_share"] = stats["tis_clipped"] / tokens
        steps.append(times)
        print(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in times.items()), flush=True)
    measured = steps[1:]
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": args.shape,
               "dtype": dtype, "fp8_engine": args.fp8, "cuda_graphs": engine.cuda_graphs,
               "rows": rows, "completion_tokens": rows * args.max_tokens,
               **{k: statistics.median(s[k] for s in measured) for k in measured[0]}}
    results["rollout_tok_s"] = results["completion_tokens"] / results["rollout"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
