"""Block-scaled FP8 GEMM (Triton) against torch's bf16 matmul and torch._scaled_mm, on square shapes.

Run on a CUDA GPU: python bench/bench_fp8_gemm.py [--sizes 4096 6144 8192] [--json out.json]
Prints TFLOP/s (2*M*N*K / median time, triton.testing.do_bench) and the ratio to bf16 in the same run.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from r1pipe.model.fp8 import kernels
from r1pipe.model.fp8 import quant as Q


def _tflops(ms: float, m: int, n: int, k: int) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def _scaled_mm_variants(qa, sa, qb, sb):
    """torch._scaled_mm: tensor-wise scales (cuBLAS FP8 peak) and 1x128/128x128 block-wise, where supported."""
    if not hasattr(torch, "_scaled_mm"):
        return {}
    one = torch.ones((), device=qa.device)
    variants = {
        "scaled_mm_tensorwise_fast_accum": lambda: torch._scaled_mm(qa, qb.t(), one, one, out_dtype=torch.bfloat16,
                                                                    use_fast_accum=True),
        "scaled_mm_tensorwise": lambda: torch._scaled_mm(qa, qb.t(), one, one, out_dtype=torch.bfloat16),
        # block-wise: scale_a [M, K/128] outer-dim-major, scale_b [K/128, N/128] (cuBLAS >= 12.9)
        "scaled_mm_blockwise": lambda: torch._scaled_mm(qa, qb.t(), sa.t().contiguous().t(), sb.t(),
                                                        out_dtype=torch.bfloat16),
    }
    results = {}
    for name, fn in variants.items():
        try:
            fn()
            torch.cuda.synchronize()
            results[name] = fn
        except Exception as err:  # unsupported layout/version: report, don't fail the benchmark
            print(f"{name}: unavailable ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 6144, 8192])
    parser.add_argument("--json", default=None, help="write all figures here")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for size in args.sizes:
        m = n = k = size
        g = torch.Generator(device="cuda").manual_seed(size)
        a = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
        qa, sa = kernels.act_quant(a)
        qw, sw = kernels.weight_quant(w)
        out = kernels.fp8_gemm(qa, sa, qw, sw, torch.bfloat16)
        ref = a.float() @ w.float().t()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        row = {"size": size, "rel_err_vs_fp32": err}
        row["bf16_tflops"] = _tflops(_bench(lambda: a @ w.t()), m, n, k)
        row["fp8_gemm_tflops"] = _tflops(_bench(lambda: kernels.fp8_gemm(qa, sa, qw, sw, torch.bfloat16)), m, n, k)
        row["fp8_gemm_plus_act_quant_tflops"] = _tflops(
            _bench(lambda: kernels.fp8_gemm(*kernels.act_quant(a), qw, sw, torch.bfloat16)), m, n, k)
        row["act_quant_ms"] = _bench(lambda: kernels.act_quant(a))
        row["tile"] = kernels.GPU_TILE
        for name, fn in _scaled_mm_variants(qa, sa, qw, sw).items():
            row[f"{name}_tflops"] = _tflops(_bench(fn), m, n, k)
            if name == "scaled_mm_blockwise":  # same function as ours? (relative to the Triton output)
                row["scaled_mm_blockwise_rel_diff"] = ((fn().float() - out.float()).norm() / out.float().norm()).item()
        row["ratio_fp8_vs_bf16"] = row["fp8_gemm_tflops"] / row["bf16_tflops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'size':>6} {'bf16':>8} {'fp8 blk':>8} {'+quant':>8} {'ratio':>6} {'smm tw':>8} {'smm blk':>8}  (TFLOP/s)")
    for r in rows:
        print(f"{r['size']:>6} {r['bf16_tflops']:8.0f} {r['fp8_gemm_tflops']:8.0f} {r['fp8_gemm_plus_act_quant_tflops']:8.0f} "
              f"{r['ratio_fp8_vs_bf16']:6.2f} {r.get('scaled_mm_tensorwise_fast_accum_tflops', float('nan')):8.0f} "
              f"{r.get('scaled_mm_blockwise_tflops', float('nan')):8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
