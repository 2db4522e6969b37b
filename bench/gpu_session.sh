#!/usr/bin/env bash
# Everything issue 36 measures on a lent GPU machine, in ONE call of at most 600 s; writes one JSON of figures.
#
#   bash bench/gpu_session.sh           # on the GPU machine: $OUT/figures.json (default OUT=gpu_out)
#   bash bench/gpu_session.sh --cpu     # the plumbing on a CPU: the same commands at tiny sizes (CUDA-only ones skipped)
#
# In order (each under its own time limit, all within BUDGET seconds, default 585):
#   gpu_tests    pytest -m gpu: FP8 kernels, grouped experts (bf16 grouped GEMM, fp32/FP8 experts in a CUDA graph),
#                the paged MLA kernel, CUDA-graph decode parity, FP8 engine parity
#   fp8_gemm     bench_fp8_gemm.py at 4096 and 8192 (goal: FP8 >= 1.6x bf16 at 8192^3)
#   train        bench_train.py --device cuda: 1.7B shape fwd+bwd vs transformers, bf16 and FP8 (goals: >= 2x
#                transformers; FP8 step >= 1.3x bf16)
#   fp8_training bench_fp8_training.py: FP8 vs fp32 loss gap on the tiny model (goal < 1%)
#   engine       bench_engine.py --device cuda --shape 1.7b: batches 1/64/256, CUDA graphs off and on, vs transformers
#                generate (goal: >= 5x at batch 256). The dense model's row waits for the dense engine (not in this
#                tree): its entry says so.
#   grpo_step    bench_grpo_step.py: one GRPO step at the 1.7B shape, PolicyWorker and engine in one process (the
#                image has no Ray), bf16 rollouts, then FP8 rollouts (grpo_step_fp8)
#   fp8_rollout  bench_fp8_rollout.py: trainer/engine log-prob mismatch of bf16 and FP8 engines (tiny model)
# The commands need torch, triton, transformers, tokenizers, safetensors, tqdm and pytest (no Ray, omegaconf,
# datasets or trl). The last step gathers every command's JSON (or its last lines) into $OUT/figures.json, with
# the goals' ratios where their figures exist.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-585}
MODE=gpu
case "${1:-}" in
    "") ;;
    --cpu) MODE=cpu ;;
    *) echo "usage: bash bench/gpu_session.sh [--cpu]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.log, under min(SECONDS, what the budget has left)
    local name=$1 seconds=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 10))
    if ((left < 15)); then
        echo "skipped: the ${BUDGET} s budget is spent" >"$OUT/$name.log"
        printf '%-14s skipped (budget)\n' "$name"
        echo "$name 0 125" >>"$OUT/status.txt"
        return
    fi
    ((seconds > left)) && seconds=$left
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $((SECONDS - start)) $rc" >>"$OUT/status.txt"
    printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-300)"
}

: >"$OUT/status.txt"
if [[ $MODE == gpu ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader >"$OUT/gpu.txt" 2>&1
    run gpu_tests 110 "$PY" -m pytest -q -o addopts= -m gpu -p no:cacheprovider tests/test_fp8_gpu.py \
        tests/test_model_gpu.py tests/test_engine_gpu.py
    run fp8_gemm 50 "$PY" bench/bench_fp8_gemm.py --sizes 4096 8192 --json "$OUT/fp8_gemm.json"
    run train 90 "$PY" bench/bench_train.py --device cuda --precisions bf16,fp8 --steps 8 --warmup 2
    run fp8_training 45 "$PY" bench/bench_fp8_training.py --device cuda --steps 200 --json "$OUT/fp8_training.json"
    run engine 130 "$PY" bench/bench_engine.py --device cuda --shape 1.7b --prompt-len 64 --new-tokens 64 \
        --batches 1,64,256 --cuda-graphs both --skip cache,spec --json "$OUT/engine.json"
    run grpo_step 60 "$PY" bench/bench_grpo_step.py --device cuda --shape 1.7b --prompts 16 --group 8 \
        --prompt-len 64 --max-tokens 64 --micro-batch 32 --steps 3
    run grpo_step_fp8 50 "$PY" bench/bench_grpo_step.py --device cuda --shape 1.7b --prompts 16 --group 8 \
        --prompt-len 64 --max-tokens 64 --micro-batch 32 --steps 3 --fp8
    run fp8_rollout 40 "$PY" bench/bench_fp8_rollout.py --device cuda
else  # the plumbing at tiny sizes: every command that runs on a CPU, with the flags above where they apply
    echo "cpu" >"$OUT/gpu.txt"
    run gpu_tests 60 "$PY" -m pytest -q -o addopts= -m gpu -p no:cacheprovider tests/test_fp8_gpu.py \
        tests/test_model_gpu.py tests/test_engine_gpu.py
    run fp8_training 60 "$PY" bench/bench_fp8_training.py --device cpu --steps 3 --batch 2 --seq 16 \
        --json "$OUT/fp8_training.json"
    run train 90 "$PY" bench/bench_train.py --device cpu --precisions fp32,bf16 --steps 2 --warmup 1 --seq 32
    run engine 120 "$PY" bench/bench_engine.py --device cpu --prompt-len 8 --new-tokens 8 --batches 1,4 \
        --cuda-graphs off --skip cache,spec --json "$OUT/engine.json"
    run grpo_step 60 "$PY" bench/bench_grpo_step.py --device cpu --steps 2
    run grpo_step_fp8 60 "$PY" bench/bench_grpo_step.py --device cpu --steps 2 --fp8
    run fp8_rollout 90 "$PY" bench/bench_fp8_rollout.py --device cpu --train-steps 5 --prompts 4 --max-tokens 8
fi

"$PY" - "$OUT" <<'EOF'
"""Gather every command's figures into figures.json: its JSON file, else the JSON on its log's last line, else the
log's last lines; then the issue's goals as ratios where their figures exist."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
figures = {"card": (out / "gpu.txt").read_text().strip(), "commands": {}}
for line in (out / "status.txt").read_text().split("\n"):
    if not line.strip():
        continue
    name, seconds, rc = line.split()
    entry = {"rc": int(rc), "seconds": int(seconds)}
    log = (out / f"{name}.log").read_text(errors="replace").rstrip().split("\n")
    path = out / f"{name}.json"
    try:
        entry["figures"] = json.loads(path.read_text()) if path.exists() else json.loads(log[-1])
    except (json.JSONDecodeError, IndexError):
        entry["tail"] = log[-5:]
    figures["commands"][name] = entry
figures["commands"]["engine_dense"] = {"skipped": "the dense engine (another issue) is not in this tree"}


def get(name):
    return figures["commands"].get(name, {}).get("figures")


goals = {}
engine = get("engine")
if isinstance(engine, dict):
    for row in engine.get("throughput", []):
        if row.get("batch") == 256:
            goals[f"engine_vs_transformers_b256_graphs_{str(row['cuda_graphs']).lower()} (goal >= 5)"] = row["speedup"]
train = get("train")
if isinstance(train, dict):
    goals["train_bf16_vs_transformers (goal >= 2)"] = train.get("ratio_bf16")
    if train.get("r1pipe_fp8_tok_s") and train.get("r1pipe_bf16_tok_s"):
        goals["fp8_train_step_vs_bf16 (goal >= 1.3)"] = train["r1pipe_fp8_tok_s"] / train["r1pipe_bf16_tok_s"]
gemm = get("fp8_gemm")
if isinstance(gemm, list):
    for row in gemm:
        if row.get("size") == 8192:
            goals["fp8_gemm_vs_bf16_8192 (goal >= 1.6)"] = row["ratio_fp8_vs_bf16"]
fp8_training = get("fp8_training")
if isinstance(fp8_training, dict):
    goals["fp8_training_loss_gap (goal < 0.01)"] = fp8_training.get("relative_gap")
figures["goals"] = goals
(out / "figures.json").write_text(json.dumps(figures, indent=1))
print(json.dumps(goals))
EOF
