"""Rollout-engine benchmark: r1pipe.engine.LLM against transformers' `generate` on the same weights, for
r1pipe's DeepSeek-V3 (--model v3, the default) or a dense Llama / Qwen2 (--model tiny-qwen2 / tiny-llama: a
DENSE_PRESETS model with random weights; or a Llama / Qwen2 checkpoint directory).

Prints, all measured in this run:
  * generated tokens/s of both at each batch size (prompts x new tokens, greedy), the ratio, and the
    weight-bandwidth limit: batch / (bytes of weights one decode step must read / memory bandwidth measured
    here by a large device copy), counting only the routed experts a batch of that size is expected to touch;
  * cache bytes per token: r1pipe's latent cache vs transformers' cache for the same model (V3 only);
  * MTP self-speculation at batch 1: speed-up over plain decoding and acceptance rate, on the tiny model
    trained briefly (main + MTP loss) on a repetitive synthetic corpus, or on --checkpoint (V3 only);
  * with --ep N (V3 only): generated tokens/s of one engine spanning N processes (expert parallelism, gloo on
    CPU, NCCL on cuda:0..N-1; each process --threads threads) against one engine in this process, per batch
    size, with the greedy outputs compared.
The last line is all figures as JSON.

  python bench/bench_engine.py                      # full: tiny model, batches 1,64,256 x 128 new tokens
  python bench/bench_engine.py --batches 1,8 --new-tokens 32 --mtp-steps 100   # quick
  python bench/bench_engine.py --device cuda --shape 1.7b --prompt-len 64 --skip cache   # the GPU shape
  python bench/bench_engine.py --device cuda --shape 1.7b --cuda-graphs both             # with and without graphs
  python bench/bench_engine.py --model tiny-qwen2 --batches 256 --new-tokens 64          # dense Qwen2 on CPU
  python bench/bench_engine.py --ep 2 --skip throughput,cache,spec --batches 1,64 --new-tokens 32  # ep-2 on CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.causal_lm import is_v3
from r1pipe.engine import LLM, SamplingParams
from r1pipe.model import ModelConfig, Transformer, lm_loss, load_pretrained, save_pretrained
from r1pipe.workers.weight_sync import free_port
from r1pipe.vocab import DENSE_PRESETS


# the DeepSeek-V3 shape of issue 15's GPU measurements: ~1.75 B parameters (without MTP)
SHAPES = {
    "tiny": {},
    "1.7b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=896,
                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32,
                 num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=512,
                 q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                 max_position_embeddings=4096, rope_scaling=None, torch_dtype="bfloat16"),
}


def model_config(shape: str) -> ModelConfig:
    base = "tiny" if shape == "tiny" else "deepseek-v3"
    return dataclasses.replace(ModelConfig.preset(base), **SHAPES[shape])


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    with torch.device(device):
        return Transformer(model_config(shape), seed=seed).to(dtype).eval()


def dense_model(spec: str, vocab_size: int, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A transformers Llama / Qwen2: a DENSE_PRESETS preset of `vocab_size` tokens with random weights (seeded),
    or the checkpoint directory `spec`."""
    if spec in DENSE_PRESETS:
        fields = dict(DENSE_PRESETS[spec])
        config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab_size, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2, **fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model.to(device).eval()


def hf_model(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MTP layer's weights are "unexpected" to transformers: expected
    logging.disable_progress_bar()

    return DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (read + write), best of 5."""
    n = (1 << 30 if device.type == "cuda" else 1 << 27) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def step_weight_bytes(model: nn.Module, batch: int) -> float:
    """Bytes of weights one decode step at this batch reads: everything but the routed experts, plus the
    routed experts a batch of `batch` tokens is expected to touch (uniform routing: E (1 - (1 - k/E)^B)); for a
    dense model every weight but an untied input embedding."""
    if not is_v3(model):
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if tied or "embed_tokens" not in n)
    c = model.config
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if ".experts." in n and "mtp" not in n)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".experts." not in n and "mtp" not in n and "embed_tokens" not in n)
    touched = 1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** batch
    return other + expert_bytes * touched


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device = torch.device("cpu")):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def throughput(model: nn.Module, hf, batches: list[int], prompt_len: int, new_tokens: int, seed: int,
               device: torch.device, dtype: torch.dtype, graph_settings: list[bool] = (False,)) -> list[dict]:
    """One row per batch size and engine.cuda_graphs setting (transformers timed once per batch size)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = []
    bandwidth = memory_bandwidth(device)
    print(f"memory bandwidth (device copy): {bandwidth / 1e9:.0f} GB/s", flush=True)
    engines = {}
    for graphs in graph_settings:
        engines[graphs] = LLM(model, max_num_seqs=max(batches), block_size=16, seed=seed, device=device, dtype=dtype,
                              max_model_len=prompt_len + new_tokens + 8,
                              cache_memory_gb=8.0 if device.type == "cuda" else 0.5, cuda_graphs=graphs)
        engines[graphs].generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=True)
    for batch in batches:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        ids = prompts.to(device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hf_out, t_hf = timed(lambda: hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None), device)
        made = batch * new_tokens
        limit = batch * bandwidth / step_weight_bytes(model, batch)
        for graphs, llm in engines.items():
            outs, t_engine = timed(lambda: llm.generate(prompts.tolist(), sp, use_tqdm=False), device)
            same = sum(o.outputs[0].token_ids == hf_out[i, prompt_len:].tolist() for i, o in enumerate(outs))
            rows.append(dict(batch=batch, cuda_graphs=graphs, engine_tok_s=made / t_engine, hf_tok_s=made / t_hf,
                             speedup=t_hf / t_engine, identical_greedy=f"{same}/{batch}",
                             weight_bandwidth_limit_tok_s=limit, engine_fraction_of_limit=made / t_engine / limit))
            print(f"batch {batch:4d} graphs {str(graphs):5s}: engine {made / t_engine:9.1f} tok/s   transformers "
                  f"{made / t_hf:9.1f} tok/s   ratio {t_hf / t_engine:5.2f}x   identical greedy outputs {same}/{batch}   "
                  f"weight-bandwidth limit {limit:10.0f} tok/s (engine at {made / t_engine / limit:.2%})", flush=True)
    return rows


def cache_bytes(model: Transformer, hf, device: torch.device, dtype: torch.dtype) -> dict:
    """Bytes per token of each cache, measured on the caches themselves after a 32-token prefill."""
    llm = LLM(model, max_num_seqs=1, block_size=16, num_blocks=8, device=device, dtype=dtype)
    ours = llm.cache.bytes_per_token
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
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
    expanded = (c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
                * torch.finfo(dtype).bits // 8)
    print(f"cache bytes/token ({str(dtype).replace('torch.', '')}, {c.num_hidden_layers} layers): r1pipe latent {ours}   transformers "
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


def train_mtp(model: Transformer, steps: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    perm = torch.randperm(vocab - 3, generator=g) + 3
    perm = torch.cat([torch.arange(3), perm])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc="train main+MTP on synthetic corpus", leave=False)
    for _ in bar:
        batch = synthetic_corpus(vocab, 16, 48, g, perm).to(device)
        loss, metrics = lm_loss(model(batch, mtp=True), batch, mtp_lambda=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return perm


def speculative(model: Transformer, perm: torch.Tensor, ks: list[int], new_tokens: int, repeats: int,
                device: torch.device) -> list[dict]:
    prompt = [5]
    for _ in range(7):
        prompt.append(int(perm[prompt[-1]]))
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    engines = {k: LLM(model, max_num_seqs=1, block_size=16, speculative_k=k, num_blocks=64, device=device)
               for k in [0, *ks]}
    for llm in engines.values():  # warm-up
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.stats.update(draft_tokens=0, accepted_tokens=0)
    best = {k: float("inf") for k in engines}
    outputs: dict[int, list[int]] = {}
    for _ in tqdm(range(repeats), desc="speculative timing (interleaved)", leave=False):
        for k, llm in engines.items():  # interleaved, best of `repeats`: robust to a shared machine's load
            out, t = timed(lambda: llm.generate([prompt], sp, use_tqdm=False), device)
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
    sampled = LLM(model, max_num_seqs=1, block_size=16, speculative_k=k, num_blocks=64, device=device)
    sampled.generate([prompt], SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0),
                     use_tqdm=False)
    rows.append(dict(k=k, temperature=1.0, acceptance=sampled.acceptance_rate))
    print(f"MTP speculative k={k} at temperature 1 (rejection sampling): acceptance {sampled.acceptance_rate:.3f}",
          flush=True)
    return rows


def ep_engine_times(path: str, prompts: list[list[list[int]]], new_tokens: int, device: torch.device,
                    dtype: torch.dtype, threads: int, ep_size: int = 1) -> list[tuple[float, list[list[int]]]]:
    """(seconds, greedy token ids) of each batch of `prompts` on one engine of the checkpoint `path` (this
    process's share of one, with ep_size > 1), after a warm-up."""
    torch.set_num_threads(threads)
    llm = LLM(path, max_num_seqs=max(len(p) for p in prompts), device=device, dtype=dtype, ep_size=ep_size,
              max_model_len=len(prompts[0][0]) + new_tokens + 8, cache_memory_gb=8.0 if device.type == "cuda" else 0.5)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    rows = []
    for batch in prompts:
        outs, t = timed(lambda: llm.generate(batch, sp, use_tqdm=False), device)
        rows.append((t, [o.outputs[0].token_ids for o in outs]))
    return rows


def _ep_process(rank: int, n: int, port: int, path: str, prompts: list, new_tokens: int, device: str, dtype: torch.dtype,
                threads: int, out: str) -> None:
    here = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if here.type == "cuda":
        torch.cuda.set_device(here)
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=n)
    rows = ep_engine_times(path, prompts, new_tokens, here, dtype, threads, n)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def expert_parallel(model: Transformer, n: int, batches: list[int], prompt_len: int, new_tokens: int, seed: int,
                    device: torch.device, dtype: torch.dtype, threads: int) -> list[dict]:
    """Tokens/s of one engine over `n` processes against one engine, one row per batch size."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, model.config.vocab_size, (b, prompt_len), generator=g).tolist() for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        one = ep_engine_times(tmp, prompts, new_tokens, device, dtype, threads)
        out = str(Path(tmp) / "ep.pt")
        mp.start_processes(_ep_process, args=(n, free_port(), tmp, prompts, new_tokens, device.type, dtype, threads, out),
                           nprocs=n)
        split = torch.load(out)
    rows = []
    for batch, (t1, ids1), (tn, idsn) in zip(batches, one, split):
        made = batch * new_tokens
        same = sum(a == b for a, b in zip(ids1, idsn))
        rows.append(dict(batch=batch, ep=n, one_engine_tok_s=made / t1, ep_engine_tok_s=made / tn, ratio=t1 / tn,
                         identical_greedy=f"{same}/{batch}"))
        print(f"batch {batch:4d}: one engine {made / t1:9.1f} tok/s   ep-{n} engine ({n} processes) {made / tn:9.1f} "
              f"tok/s   ratio {t1 / tn:5.2f}x   identical greedy outputs {same}/{batch}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both peers and the MTP part run there)")
    ap.add_argument("--model", default="v3",
                    help="v3 (r1pipe's DeepSeek-V3 of --shape), a dense preset (" + ", ".join(DENSE_PRESETS) + ": "
                         "random weights, --vocab tokens) or a Llama / Qwen2 checkpoint directory; dense models run "
                         "the throughput part only")
    ap.add_argument("--vocab", type=int, default=512, help="vocabulary of a dense preset (the V3 tiny preset's)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="model for the throughput and cache parts (random weights); 1.7b: issue 15's GPU shape")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both peers")
    ap.add_argument("--spec-k", default="1,2,3,4")
    ap.add_argument("--mtp-steps", type=int, default=150, help="training steps for the MTP benchmark model")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an MTP-trained checkpoint instead of training")
    ap.add_argument("--save-checkpoint", type=Path, default=None, help="keep the MTP-trained model here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: throughput,cache,spec")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-graphs", choices=("auto", "on", "off", "both"), default="auto",
                    help="engine.cuda_graphs for the throughput part (auto: on on CUDA; both: a row for each)")
    ap.add_argument("--ep", type=int, default=1,
                    help="N > 1: also time one engine spanning N processes (expert parallelism; V3 only) against one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype {dtype_name!r}: expected float32, bfloat16 or float16")
    dtype = getattr(torch, dtype_name)
    dense = args.model != "v3"
    graph_settings = {"auto": [device.type == "cuda" and not dense], "on": [True], "off": [False],
                      "both": [False, True]}[args.cuda_graphs]
    if dense and any(graph_settings):
        raise SystemExit(f"--cuda-graphs {args.cuda_graphs}: the engine runs dense models without CUDA graphs")
    if any(graph_settings) and device.type != "cuda":
        raise SystemExit(f"--cuda-graphs {args.cuda_graphs}: CUDA graphs need --device cuda")
    skip = set(filter(None, args.skip.split(",")))
    if dense and args.ep > 1:
        raise SystemExit(f"--ep {args.ep}: expert parallelism splits the routed experts of r1pipe's DeepSeek-V3")
    if dense:
        model = dense_model(args.model, args.vocab, device, dtype, args.seed)
        print(f"{args.model} ({model.config.model_type}): {model.num_parameters() / 1e6:.2f} M parameters, "
              f"{dtype_name} on {device}, {args.threads} thread(s)", flush=True)
        results = {"threads": args.threads, "device": str(device), "model": args.model, "dtype": dtype_name,
                   "throughput": throughput(model, model, [int(b) for b in args.batches.split(",")], args.prompt_len,
                                            args.new_tokens, args.seed, device, dtype, graph_settings)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
        return
    results = {"threads": args.threads, "device": str(device), "shape": args.shape, "dtype": dtype_name}
    model = build_model(args.shape, device, dtype, args.seed)
    hf = None
    if not {"throughput", "cache"} <= skip:
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            hf = hf_model(Path(tmp), device, dtype)
    print(f"DeepSeek-V3 shape {args.shape}: {model.num_parameters() / 1e6:.2f} M parameters, {dtype_name} on "
          f"{device}, {args.threads} thread(s)", flush=True)
    if "throughput" not in skip:
        results["throughput"] = throughput(model, hf, [int(b) for b in args.batches.split(",")], args.prompt_len,
                                           args.new_tokens, args.seed, device, dtype, graph_settings)
    if "cache" not in skip:
        results["cache"] = cache_bytes(model, hf, device, dtype)
    if args.ep > 1:
        results["expert_parallel"] = expert_parallel(model, args.ep, [int(b) for b in args.batches.split(",")],
                                                     args.prompt_len, args.new_tokens, args.seed, device, dtype,
                                                     args.threads)
    del model, hf
    if "spec" not in skip:
        if args.checkpoint is not None:
            spec_model = load_pretrained(args.checkpoint, device=device).eval()
            g = torch.Generator().manual_seed(args.seed)
            perm = torch.cat([torch.arange(3), torch.randperm(spec_model.config.vocab_size - 3, generator=g) + 3])
        else:
            spec_model = Transformer(ModelConfig.preset("tiny"), seed=args.seed + 1).to(device)
            perm = train_mtp(spec_model, args.mtp_steps, args.seed, device)
            if args.save_checkpoint is not None:
                save_pretrained(spec_model, args.save_checkpoint)
        results["speculative"] = speculative(spec_model, perm, [int(k) for k in args.spec_k.split(",")],
                                             args.new_tokens, args.repeats, device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
