"""FP8 rollouts against bf16 ones: the trainer/engine log-prob mismatch each engine leaves for GRPO to correct.

The tiny DeepSeek-V3 (ModelConfig.preset("tiny")) is trained briefly on a synthetic corpus (each next token a
fixed permutation of the current one, as bench_engine's MTP model) so its distributions are peaked, then two
engines sample the same seeded prompts at temperature 1: a bf16 engine and an FP8 one (rl.rollout.engine.fp8: V3's
projections in FP8 128x128 blocks on 1x128 activation tiles, the rest bf16). Every sampled token is scored by
the fp32 trainer (the model's full-sequence forward, as GRPO's old log-probs), and the FP8 engine's tokens also
by the bf16 model, giving per engine:
  mean and max |trainer - engine| log-prob (what GRPO logs as logprob_mismatch/*), and the share of tokens
  whose TIS weight min(pi_trainer / pi_engine, 2) is capped;
  fp8_vs_bf16: mean and max |bf16 - FP8| log-prob on the FP8 engine's tokens.
The last line is all figures as JSON.

  python bench/bench_fp8_rollout.py                     # CPU, torch reference FP8 GEMMs
  python bench/bench_fp8_rollout.py --device cuda       # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from bench_engine import synthetic_corpus, train_mtp
from r1pipe.algo import tis_weights
from r1pipe.engine import LLM, SamplingParams
from r1pipe.model import ModelConfig, Transformer


@torch.no_grad()
def score(model: Transformer, prompt: list[int], tokens: list[int], device: torch.device) -> torch.Tensor:
    """log_softmax of the model's logits at each completion token, from one full-sequence forward."""
    ids = torch.tensor([prompt + tokens], device=device)
    logp = model(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(tokens, device=device)[:, None])[:, 0].cpu()


def mismatch(engine_logp: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (other - engine_logp).abs()
    _, capped = tis_weights(other, engine_logp, 2.0)
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "tis_capped_share": float(capped.float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-steps", type=int, default=40,
                    help="training steps of the tiny model (0: random; 40 leaves a loss near 1, 150 near 0.01)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Transformer(ModelConfig.preset("tiny"), seed=args.seed).to(device)
    perm = train_mtp(model, args.train_steps, args.seed, device) if args.train_steps else None
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    if perm is not None:  # prompts from the corpus the model learnt, so its next tokens are peaked
        prompts = synthetic_corpus(vocab, args.prompts, 8, g, perm).tolist()
    else:
        prompts = torch.randint(3, vocab, (args.prompts, 8), generator=g).tolist()
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    sp = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=args.seed, ignore_eos=True)
    results: dict = {"device": str(device), "model": "tiny", "train_steps": args.train_steps,
                     "tokens_per_engine": args.prompts * args.n * args.max_tokens}
    for name, fp8 in (("bf16_engine", False), ("fp8_engine", True)):
        llm = LLM(copy.deepcopy(model), dtype="bfloat16", device=device, num_blocks=1024, fp8=fp8,
                  cuda_graphs=False if device.type != "cuda" else None)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        engine, trainer, bf16 = [], [], []
        for prompt, out in zip(prompts, outs):
            for c in out.outputs:
                engine.append(torch.tensor(c.logprobs))
                trainer.append(score(model, prompt, c.token_ids, device))
                if fp8:
                    bf16.append(score(bf16_model, prompt, c.token_ids, device))
        engine = torch.cat(engine)
        results[name] = {"trainer_vs_engine": mismatch(engine, torch.cat(trainer)),
                         "mean_logprob": float(engine.mean())}
        if fp8:
            results[name]["fp8_vs_bf16"] = mismatch(engine, torch.cat(bf16))
        print(f"{name}: trainer vs engine {results[name]['trainer_vs_engine']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
