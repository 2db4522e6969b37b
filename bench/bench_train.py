"""Training forward+backward tokens/s: r1pipe's DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Both load the same checkpoint (written once by transformers with random weights), see the same batches and
compute the same loss (next-token cross-entropy on the main head; no MTP). Precisions, each with fp32 master
weights and the forward under autocast for both implementations alike:
  fp32, bf16 (autocast) for both; fp8 (r1pipe only: block-scaled FP8 projections + bf16 autocast; CUDA only),
  whose ratio is taken against transformers in bf16.
CPU default: a tiny shape. `--device cuda`: the 1.7B shape of issue 12. The last printed line is a JSON object.

  python bench/bench_train.py                      # CPU, tiny
  python bench/bench_train.py --device cuda        # 1.7B shape, 8 x 512 tokens, bf16 and fp8
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
    args = ap.parse_args()
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
