"""Rollout-engine benchmark: r1pipe.engine.LLM against transformers' `generate` on the same tiny weights.

Prints, all measured in this run:
  * generated tokens/s of both at each batch size (prompts x new tokens, greedy) and the ratio;
  * cache bytes per token: r1pipe's latent cache vs transformers' cache for the same model;
  * MTP self-speculation at batch 1: speed-up over plain decoding and acceptance rate, on the tiny model
    trained briefly (main + MTP loss) on a repetitive synthetic corpus, or on --checkpoint.

  python bench/bench_engine.py                      # full: batches 1,64,256 x 128 new tokens
  python bench/bench_engine.py --batches 1,8 --new-tokens 32 --mtp-steps 100   # quick
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from r1pipe.engine import LLM, SamplingParams
from r1pipe.model import ModelConfig, Transformer, lm_loss, load_pretrained, save_pretrained


def hf_model(path: Path):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MTP layer's weights are "unexpected" to transformers: expected
    logging.disable_progress_bar()

    return DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def throughput(model: Transformer, hf, batches: list[int], prompt_len: int, new_tokens: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = []
    llm = LLM(model, max_num_seqs=max(batches), block_size=16, seed=seed)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=True)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    for batch in batches:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        outs, t_engine = timed(lambda: llm.generate(prompts.tolist(), sp, use_tqdm=False))
        mask = torch.ones_like(prompts)
        with torch.inference_mode():
            hf_out, t_hf = timed(lambda: hf.generate(
                input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None))
        same = sum(o.outputs[0].token_ids == hf_out[i, prompt_len:].tolist() for i, o in enumerate(outs))
        made = batch * new_tokens
        rows.append(dict(batch=batch, engine_tok_s=made / t_engine, hf_tok_s=made / t_hf,
                         speedup=t_hf / t_engine, identical_greedy=f"{same}/{batch}"))
        print(f"batch {batch:4d}: engine {made / t_engine:9.1f} tok/s   transformers {made / t_hf:9.1f} tok/s   "
              f"ratio {t_hf / t_engine:5.2f}x   identical greedy outputs {same}/{batch}", flush=True)
    return rows


def cache_bytes(model: Transformer, hf) -> dict:
    """Bytes per token of each cache, measured on the caches themselves after a 32-token prefill."""
    llm = LLM(model, max_num_seqs=1, block_size=16, num_blocks=8)
    ours = llm.cache.bytes_per_token
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        past = hf(input_ids=ids, use_cache=True).past_key_values
    tensors = []
    for layer in getattr(past, "layers", []):
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    if not tensors:  # older transformers: key_cache / value_cache lists
        tensors = list(getattr(past, "key_cache", [])) + list(getattr(past, "value_cache", []))
    theirs = sum(t.numel() * t.element_size() for t in tensors) / ids.shape[1]
    c = model.config
    # the multi-head cache MLA replaces: per layer, per head, a full key and value
    expanded = c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4
    print(f"cache bytes/token (fp32, {c.num_hidden_layers} layers): r1pipe latent {ours}   transformers "
          f"{theirs:.0f} (ratio {theirs / ours:.2f})   expanded multi-head K/V {expanded} "
          f"(ratio {expanded / ours:.2f})", flush=True)
    return dict(latent_bytes_per_token=ours, hf_bytes_per_token=theirs, expanded_kv_bytes_per_token=expanded)


def synthetic_corpus(vocab: int, batch: int, length: int, g: torch.Generator, perm: torch.Tensor) -> torch.Tensor:
    """Repetitive text: each next token is a fixed permutation of the current one (MTP can learn t+2)."""
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(3, vocab, (batch,), generator=g)
    for t in range(1, length):
        x[:, t] = perm[x[:, t - 1]]
    return x


def train_mtp(model: Transformer, steps: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    perm = torch.randperm(vocab - 3, generator=g) + 3
    perm = torch.cat([torch.arange(3), perm])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc="train main+MTP on synthetic corpus", leave=False)
    for _ in bar:
        batch = synthetic_corpus(vocab, 16, 48, g, perm)
        loss, metrics = lm_loss(model(batch, mtp=True), batch, mtp_lambda=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return perm


def speculative(model: Transformer, perm: torch.Tensor, ks: list[int], new_tokens: int, repeats: int) -> list[dict]:
    prompt = [5]
    for _ in range(7):
        prompt.append(int(perm[prompt[-1]]))
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    engines = {k: LLM(model, max_num_seqs=1, block_size=16, speculative_k=k, num_blocks=64) for k in [0, *ks]}
    for llm in engines.values():  # warm-up
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.stats.update(draft_tokens=0, accepted_tokens=0)
    best = {k: float("inf") for k in engines}
    outputs: dict[int, list[int]] = {}
    for _ in tqdm(range(repeats), desc="speculative timing (interleaved)", leave=False):
        for k, llm in engines.items():  # interleaved, best of `repeats`: robust to a shared machine's load
            out, t = timed(lambda: llm.generate([prompt], sp, use_tqdm=False))
            best[k] = min(best[k], t)
            outputs[k] = out[0].outputs[0].token_ids
    rows = []
    base_t = best[0]
    for k in ks:
        t, acc, same = best[k], engines[k].acceptance_rate, outputs[k] == outputs[0]
        rows.append(dict(k=k, speedup=base_t / t, acceptance=acc, same_output=same,
                         plain_tok_s=new_tokens / base_t, spec_tok_s=new_tokens / t))
        print(f"MTP speculative k={k}: {new_tokens / t:7.1f} tok/s vs plain {new_tokens / base_t:7.1f} tok/s   "
              f"speed-up {base_t / t:4.2f}x   acceptance {acc:.3f}   output identical {same}", flush=True)
    # sampling at temperature 1 goes through the rejection rule (acceptance = E[sum min(p, q)])
    k = max(ks)
    sampled = LLM(model, max_num_seqs=1, block_size=16, speculative_k=k, num_blocks=64)
    sampled.generate([prompt], SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0),
                     use_tqdm=False)
    rows.append(dict(k=k, temperature=1.0, acceptance=sampled.acceptance_rate))
    print(f"MTP speculative k={k} at temperature 1 (rejection sampling): acceptance {sampled.acceptance_rate:.3f}",
          flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both peers")
    ap.add_argument("--spec-k", default="1,2,3,4")
    ap.add_argument("--mtp-steps", type=int, default=150, help="training steps for the MTP benchmark model")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an MTP-trained checkpoint instead of training")
    ap.add_argument("--save-checkpoint", type=Path, default=None, help="keep the MTP-trained model here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: throughput,cache,spec")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"threads": args.threads}
    model = Transformer(ModelConfig.preset("tiny"), seed=args.seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = hf_model(Path(tmp)) if not {"throughput", "cache"} <= skip else None
    print(f"tiny DeepSeek-V3: {model.num_parameters() / 1e6:.2f} M parameters, {args.threads} thread(s)", flush=True)
    if "throughput" not in skip:
        results["throughput"] = throughput(model, hf, [int(b) for b in args.batches.split(",")], args.prompt_len,
                                           args.new_tokens, args.seed)
    if "cache" not in skip:
        results["cache"] = cache_bytes(model, hf)
    if "spec" not in skip:
        if args.checkpoint is not None:
            spec_model = load_pretrained(args.checkpoint).eval()
            g = torch.Generator().manual_seed(args.seed)
            perm = torch.cat([torch.arange(3), torch.randperm(spec_model.config.vocab_size - 3, generator=g) + 3])
        else:
            spec_model = Transformer(ModelConfig.preset("tiny"), seed=args.seed + 1)
            perm = train_mtp(spec_model, args.mtp_steps, args.seed)
            if args.save_checkpoint is not None:
                save_pretrained(spec_model, args.save_checkpoint)
        results["speculative"] = speculative(spec_model, perm, [int(k) for k in args.spec_k.split(",")],
                                             args.new_tokens, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
