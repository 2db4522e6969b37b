"""Training forward+backward tokens/s: r1pipe's DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Both load the same checkpoint (written once by transformers with random weights), see the same batches and
compute the same loss (next-token cross-entropy on the main head; no MTP). Precisions, each with fp32 master
weights and the forward under autocast for both implementations alike:
  fp32, bf16 (autocast) for both; fp8 (r1pipe only: block-scaled FP8 projections + bf16 autocast; CUDA only),
  whose ratio is taken against transformers in bf16.
CPU default: a tiny shape. `--device cuda`: the 1.7B shape of issue 12. The last printed line is a JSON object.

`--ep N` measures something else: N trainer workers (gloo processes, one CPU thread each) taking supervised steps
on a shape with 64 routed experts, first FSDP2 alone (every layer's experts gathered on every worker), then
expert parallelism at ep_size N with FSDP2 for the rest (each worker keeps 64/N experts per layer and sends
tokens to them). It prints each layout's median step seconds, the bytes each worker holds (parameters and
AdamW state, measured on its tensors) and the bytes of the largest unit gathered during a step (parameters a
worker materialises at once: FSDP2 gathers a whole MoE layer; under EP the experts stay local).

  python bench/bench_train.py                      # CPU, tiny
  python bench/bench_train.py --device cuda        # 1.7B shape, 8 x 512 tokens, bf16 and fp8
  python bench/bench_train.py --ep 2               # CPU, 2 workers: FSDP2 alone against ep_size 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # 64 routed experts (the expert-parallel comparison, --ep)
    "moe64": dict(vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                  n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6, first_k_dense_replace=1,
                  kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                 n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
                 kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    # issue 12: ~1.7B parameters
    "1.7b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                 n_routed_experts=32, n_group=4, topk_group=4, num_experts_per_tok=4, first_k_dense_replace=1,
                 kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def write_checkpoint(shape: str, path: str) -> None:
    import transformers

    config = transformers.DeepseekV3Config(**SHAPES[shape], routed_scaling_factor=2.5, norm_topk_prob=True,
                                           max_position_embeddings=4096, rope_scaling=None,
                                           num_nextn_predict_layers=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)


def load_models(path: str, device: str):
    import transformers

    from r1pipe.model import load_pretrained

    ours = load_pretrained(path, dtype=torch.float32, device=device).train()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation="sdpa").to(device).train()
    return ours, theirs


def timed_pair(first, second, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """Median seconds of one step of each, the two interleaved step by step so both see the same machine load."""
    def once(step) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(warmup):
        once(first), once(second)
    times = [(once(first), once(second)) for _ in range(steps)]
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times)


def _ep_worker(rank: int, world: int, port: int, path: str, ep_size: int, batch: int, seq: int, steps: int,
               warmup: int, out: str) -> None:
    """One trainer worker of the --ep comparison: supervised steps on its rows, timed after `warmup`."""
    import torch.distributed as dist

    from r1pipe.algo.sft import SupervisedLoss, TargetCounts
    from r1pipe.data.batch import collate
    from r1pipe.workers.policy import PolicyConfig, PolicyWorker
    from r1pipe.workers.sharding import expert_parameters, local_bytes

    torch.set_num_threads(1)
    cfg = PolicyConfig(lr=1e-4, micro_batch_size=batch, supervised=SupervisedLoss(mtp=False), ep_size=ep_size)
    worker = PolicyWorker(rank, world, path, cfg)
    worker.init_distributed(f"tcp://127.0.0.1:{port}")
    vocab = SHAPES["moe64"]["vocab_size"]
    g = torch.Generator().manual_seed(rank)
    seqs = [torch.randint(0, vocab, (seq,), generator=g).tolist() for _ in range(batch)]
    rows = collate(seqs, [[True] * seq for _ in range(batch)], pad_id=0)
    counts = TargetCounts.of(rows.target_mask, 0)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        worker.supervised_step(rows, counts, num_micro=1)
        times.append(time.perf_counter() - t)
    moe = worker.model.moe_layers()[0]
    layer = worker.model.blocks[moe.config.first_k_dense_replace]  # a whole MoE layer, as FSDP2 gathers it
    placed = {id(p) for p in expert_parameters(worker.model)}
    gathered = sum(p.numel() * 4 for p in layer.parameters() if id(p) not in placed)
    result = {**local_bytes(worker.model, worker.optimizer), "largest_gathered_unit": gathered,
              "step_s": statistics.median(times[warmup:])}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def ep_comparison(args) -> None:
    """--ep N: FSDP2 alone against expert parallelism at ep_size N, N gloo workers, the moe64 shape."""
    import torch.multiprocessing as mp

    from r1pipe.workers.weight_sync import free_port

    batch, seq = args.batch or 4, args.seq or 128
    result: dict = {"shape": "moe64", "workers": args.ep, "tokens_per_worker_step": batch * seq}
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint("moe64", path)
        for name, ep_size in (("fsdp2", 1), (f"ep{args.ep}", args.ep)):
            out = f"{path}/{name}.json"
            mp.spawn(_ep_worker, args=(args.ep, free_port(), path, ep_size, batch, seq, args.steps, args.warmup, out),
                     nprocs=args.ep)
            with open(out) as f:
                result[name] = json.load(f)
            r = result[name]
            print(f"{name:6s} step {r['step_s']:.3f} s   per worker: parameters {r['parameters'] / 2**20:.2f} MiB, "
                  f"AdamW {r['optimizer'] / 2**20:.2f} MiB, largest gathered unit {r['largest_gathered_unit'] / 2**20:.2f} MiB",
                  flush=True)
    result["step_ratio_fsdp2_over_ep"] = round(result["fsdp2"]["step_s"] / result[f"ep{args.ep}"]["step_s"], 3)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: tiny on CPU, 1.7b on CUDA")
    ap.add_argument("--batch", type=int, help="default: 8")
    ap.add_argument("--seq", type=int, help="default: 128 on CPU, 512 on CUDA")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp8 (default: fp32,bf16 on CPU; "
                                                        "bf16,fp8 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--ep", type=int, default=0, help="N: FSDP2 alone against expert parallelism, N CPU workers")
    args = ap.parse_args()
    if args.ep:
        return ep_comparison(args)
    from r1pipe.model import Precision, apply_precision

    shape = args.shape or ("1.7b" if args.device == "cuda" else "tiny")
    batch, seq = args.batch or 8, args.seq or (512 if args.device == "cuda" else 128)
    precisions = (args.precisions or ("bf16,fp8" if args.device == "cuda" else "fp32,bf16")).split(",")
    if "fp8" in precisions and args.device != "cuda":
        raise SystemExit("--precisions fp8 needs --device cuda (the CPU FP8 path is the torch reference)")
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(shape, path)
        ours, theirs = load_models(path, args.device)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    def our_step():
        loss_of(ours(ids).logits).backward()
        ours.zero_grad(set_to_none=True)

    def their_step():
        with torch.autocast(args.device, dtype=compute, enabled=compute != torch.float32):
            logits = theirs(input_ids=ids).logits
        loss_of(logits).backward()
        theirs.zero_grad(set_to_none=True)

    tokens = batch * seq
    result: dict = {"device": args.device, "shape": shape, "tokens_per_step": tokens,
                    "threads": torch.get_num_threads()}
    for name in precisions:
        compute = torch.float32 if name == "fp32" else torch.bfloat16  # fp8: transformers runs bf16
        apply_precision(ours, Precision(dtype=compute, fp8=name == "fp8"))
        ours_s, theirs_s = timed_pair(our_step, their_step, args.steps, args.warmup, args.device)
        ours_rate, theirs_rate = tokens / ours_s, tokens / theirs_s
        peer = "bf16" if name == "fp8" else name
        result[f"r1pipe_{name}_tok_s"] = round(ours_rate)
        result[f"transformers_{peer}_tok_s"] = round(theirs_rate)
        result[f"ratio_{name}"] = round(ours_rate / theirs_rate, 3)
        print(f"{name:5s} r1pipe {ours_rate:10.0f} tok/s   transformers ({peer}) {theirs_rate:10.0f} tok/s   "
              f"ratio {ours_rate / theirs_rate:.2f}x", flush=True)
    apply_precision(ours, Precision())
    with torch.no_grad():  # same weights, same logits (fp32)
        diff = (ours(ids[:2]).logits - theirs(input_ids=ids[:2]).logits.float()).abs().max()
    result["fp32_max_logit_diff"] = float(diff)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
