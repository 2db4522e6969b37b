#!/usr/bin/env bash
# The GPU checks of issues 12 and 15 on a lent GPU machine, in two parts that each fit one call of at most
# 600 s. Each part runs its commands under a time limit, writes one log per command to $OUT (default:
# ./gpu_out), and prints the last line of each log, which is that command's JSON or pytest summary.
#
#   bash bench/gpu_session.sh 1   # GPU tests, FP8 GEMM speed, training fwd+bwd vs transformers (1.7B shape)
#   bash bench/gpu_session.sh 2   # rollout engine vs transformers generate (1.7B shape), MTP speculation
#
# The commands need only torch, triton, transformers, tokenizers, safetensors, tqdm, rich and pytest, which
# the device image carries (checked here by importing every module they load with ray, omegaconf, datasets
# and trl blocked). r1pipe's GRPO stage needs Ray, which that image lacks, so bench_grpo.py is not run.
# This script has not yet run on a GPU. Of its commands, the FP8 kernel tests and bench_fp8_gemm.py ran on an
# H100 in an earlier session; the others have not run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run NAME SECONDS COMMAND...: the command's output to $OUT/NAME.log, then its status and last line
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-600)"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader >"$OUT/gpu.txt" 2>&1
case "${1:-}" in
    1)
        run gpu_tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gpu.py tests/test_model_gpu.py \
            tests/test_engine_gpu.py
        run fp8_gemm 120 "$PY" bench/bench_fp8_gemm.py --sizes 4096 8192
        run train 240 "$PY" bench/bench_train.py --device cuda
        ;;
    2)
        run engine 560 "$PY" bench/bench_engine.py --device cuda --shape 1.7b --prompt-len 64 --skip cache
        ;;
    *)
        echo "usage: bash bench/gpu_session.sh 1|2" >&2
        exit 2
        ;;
esac
