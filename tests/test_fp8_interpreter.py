"""The Triton FP8 kernels under Triton's interpreter (CPU) against the torch reference.

TRITON_INTERPRET must be set before triton is first imported, so the kernels run in one fresh
subprocess that reports every comparison as JSON; the tests below assert on that report.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECKS = textwrap.dedent('''
    import json, torch
    from r1pipe.model.fp8 import quant as Q
    from r1pipe.model.fp8.gemm import act_quant, weight_quant, weight_dequant, fp8_gemm

    def same_bits(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    g = torch.Generator().manual_seed(0)
    report = {}
    # random data over a wide dynamic range, ragged K (300) and M (37)
    x = torch.randn(37, 300, generator=g) * torch.exp2(torch.randint(-8, 8, (37, 1), generator=g).float())
    w = torch.randn(200, 300, generator=g)
    for pow2 in (False, True):
        qt, st = act_quant(x, pow2, backend="triton")
        qr, sr = act_quant(x, pow2, backend="torch")
        report[f"act_quant_pow2={pow2}"] = same_bits(qt, qr) and torch.equal(st, sr)
        qt, st = weight_quant(w, pow2, backend="triton")
        qr, sr = weight_quant(w, pow2, backend="torch")
        report[f"weight_quant_pow2={pow2}"] = same_bits(qt, qr) and torch.equal(st, sr)
    qw, sw = weight_quant(w, backend="torch")
    report["weight_dequant"] = torch.equal(weight_dequant(qw, sw, torch.float32, backend="triton"),
                                           weight_dequant(qw, sw, torch.float32, backend="torch"))
    # E4M3 ties and carries: the interpreter's own cast would get these wrong (see docs/fp8.md)
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(Q.FP8_DTYPE).float()
    values = torch.cat([(grid[1:] + grid[:-1]) / 2, grid])
    values = torch.cat([values, -values, torch.zeros(-2 * len(values) % 127)]).view(-1, 127)
    tiles = torch.cat([torch.full((len(values), 1), 448.0), values], 1)  # scale exactly 1 per tile
    qt, _ = act_quant(tiles, backend="triton")
    report["ties_round_to_nearest_even"] = same_bits(qt, tiles.to(Q.FP8_DTYPE))

    # GEMM on exactly representable operands: integer partial sums, all scales 1 -> bit-exact
    a = torch.randint(-16, 17, (24, 384), generator=g).float(); a[:, ::128] = 448.0
    b = torch.randint(-16, 17, (160, 384), generator=g).float(); b[:, ::128] = 448.0
    qa, sa = act_quant(a, backend="torch"); qb, sb = weight_quant(b, backend="torch")
    exact = fp8_gemm(qa, sa, qb, sb, backend="triton")
    report["gemm_representable_exact"] = torch.equal(exact.double(), a.double() @ b.double().t())
    # random, ragged shapes, both scale layouts: same function up to fp32 summation order
    for name, (m, n, k, rows) in {"gemm_weight_blocks": (37, 200, 300, 128), "gemm_tile_rows": (20, 45, 130, 1)}.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        qa, sa = act_quant(a, backend="torch")
        qb, sb = act_quant(b, backend="torch") if rows == 1 else weight_quant(b, backend="torch")
        out = fp8_gemm(qa, sa, qb, sb, torch.float32, rows, backend="triton")
        ref = fp8_gemm(qa, sa, qb, sb, torch.float32, rows, backend="torch")
        report[name] = rel(out, ref)
    out_bf16 = fp8_gemm(qa, sa, qb, sb, torch.bfloat16, 1, backend="triton")
    report["gemm_bf16_out"] = [str(out_bf16.dtype), rel(out_bf16.float(), ref)]
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", ["act_quant_pow2=False", "act_quant_pow2=True", "weight_quant_pow2=False",
                                   "weight_quant_pow2=True", "weight_dequant", "ties_round_to_nearest_even",
                                   "gemm_representable_exact"])
def test_kernel_bit_exact_with_reference(report, check):
    assert report[check] is True


@pytest.mark.parametrize("check", ["gemm_weight_blocks", "gemm_tile_rows"])
def test_gemm_random_matches_reference_to_fp32_rounding(report, check):
    assert report[check] < 1e-6


def test_gemm_bf16_output(report):
    dtype, err = report["gemm_bf16_out"]
    assert dtype == "torch.bfloat16" and err < 8e-3  # bf16 keeps 8 bits: <= 2^-9 relative per value
