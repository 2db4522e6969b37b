"""Rejection-sampling throughput against the engine's raw generate on the same prompts.

Both sides sample k completions of the same mixed-domain prompts (R1-world math and code tasks,
already tokenized) from the same checkpoint with the same seeds and max_tokens, one engine thread:
- peer: `r1pipe.engine.LLM.generate` in this process, every prompt in one call, no scoring;
- rejection sampling: the stage's ScoredSampler, a Ray rollout worker streaming the prompts that
  finish after each engine step while the driver scores them on the RewardPool (math accuracy;
  code tests in the sandbox), plus the stage's judging (grader, filters, dedupe, selection);
  actor start-up is not timed.
Also timed: the same work with scoring after generation (no overlap), on fresh actors.
The ratio is generated tokens/s of rejection sampling over the raw engine's (goal >= 0.8): the
median over `--repeats` runs of each, alternating (fresh actors each time, warmed up untimed).

    python bench/bench_rejection_sampling.py [--model DIR] [--prompts 384] [--k 4] [--max-tokens 64] [--repeats 3]
Chunks are the stage's default shard size. Without --model a random tiny V3 is built (every
completion runs to max_tokens and no program compiles): a trained checkpoint (e.g. the R1 run's
reasoning-RL checkpoint) is the realistic case. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def prompt_rows(model_dir: Path, n: int, code_share: float, seed: int) -> list:
    import random

    from r1pipe.data.tokenizer import load_tokenizer
    from r1pipe.data.rows import PromptRow
    from r1pipe.data.synthetic import CodeTask, code_row, math_row, sample_problem

    tok = load_tokenizer(model_dir)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = sample_problem(rng, ["add", "sub"], 2)
        row = code_row(CodeTask(p), f"c{i}") if rng.random() < code_share else math_row(p, f"m{i}")
        rows.append(PromptRow(row["id"], row["problem"], row["prompt"], tok(row["prompt"], add_special_tokens=False).input_ids, row))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an r1pipe checkpoint (default: a random tiny V3)")
    ap.add_argument("--prompts", type=int, default=384)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="prompts per generation call (default: the stage's shard_size)")
    ap.add_argument("--code-share", type=float, default=0.25)
    ap.add_argument("--reward-workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="alternating raw / rejection-sampling runs (median ratio)")
    args = ap.parse_args()

    import ray
    import torch

    from r1pipe.config import make_config
    from r1pipe.engine import LLM, SamplingParams
    from r1pipe.rewards.readability import build_filters
    from r1pipe.stages.configs import RejectionSampleConfig
    from r1pipe.stages.rejection_sample import judge
    from r1pipe.stages.scored_sampling import Sampling, ScoredSampler

    torch.set_num_threads(1)
    args.chunk = args.chunk or RejectionSampleConfig().shard_size
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model = Path(args.model)
    else:
        from tiny_models import make_tiny_v3

        model = make_tiny_v3(Path(tmp.name) / "model")
    every = prompt_rows(model, args.prompts + 16, args.code_share, seed=0)
    rows, warm = every[: args.prompts], every[args.prompts:]  # warm-ups run on prompts outside the timed set
    sampling = Sampling(k=args.k, temperature=1.0, max_tokens=args.max_tokens, stop=("</answer>",), seed=0)

    llm = LLM(str(model), seed=0)
    params = [SamplingParams(n=args.k, temperature=1.0, max_tokens=args.max_tokens, stop=["</answer>"],
                             seed=sampling.prompt_seed(i), logprobs=True) for i in range(len(rows))]
    llm.generate([r.prompt_ids for r in warm], params[: len(warm)], use_tqdm=False)  # warm-up
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    weights = {"accuracy": 1.0, "code": 1.0, "format": 0.1, "language": 0.1}
    cfg = make_config(RejectionSampleConfig, {"k": args.k, "max_tokens": args.max_tokens, "reward_weights": weights,
                                              "resources.reward.workers": args.reward_workers})
    filters = build_filters(cfg.filters)

    def raw() -> tuple[int, float]:
        """The peer: raw engine generate, every prompt in one call, no scoring."""
        t0 = time.perf_counter()
        outs = llm.generate([r.prompt_ids for r in rows], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t0

    def rejection_sampling() -> tuple[int, float, int]:
        """Fresh actors each time (no verdict cached by an earlier repeat), warmed up, then timed."""
        sampler = ScoredSampler(str(model), sampling, weights, resources=cfg.resources)
        list(sampler.run(warm, args.chunk))  # warm-up: actors loaded, sandbox ready
        t0 = time.perf_counter()
        tokens = kept = 0
        for chunk in sampler.run(rows, args.chunk):
            for row, samples in zip(chunk.rows, chunk.samples):
                tokens += sum(s.num_tokens for s in samples)
                kept += len(judge(row.reference, samples, list(weights), filters, cfg.max_per_prompt, cfg.select)[0])
        seconds = time.perf_counter() - t0
        sampler.shutdown()
        return tokens, seconds, kept

    # raw and rejection sampling alternate, so a slow spell of a shared machine hits both
    ratios, raw_runs, rs_runs = [], [], []
    for rep in range(args.repeats):
        raw_tokens, raw_s = raw()
        tokens, rs_s, kept = rejection_sampling()
        raw_runs.append(raw_tokens / raw_s)
        rs_runs.append(tokens / rs_s)
        ratios.append(rs_runs[-1] / raw_runs[-1])
        print(f"repeat {rep + 1}: raw {raw_runs[-1]:.0f} tok/s, rejection sampling {rs_runs[-1]:.0f} tok/s "
              f"({kept} kept) -> {ratios[-1]:.2f}x")
    del llm

    # no overlap: all generation first, then all scoring (fresh actors: no verdict cached by the runs above)
    sampler = ScoredSampler(str(model), sampling, weights, resources=cfg.resources)
    list(sampler.run(warm, args.chunk))
    t0 = time.perf_counter()
    gen = ray.get(sampler.workers[0].generate.remote([r.prompt_ids for r in rows], args.k, 1.0, args.max_tokens,
                                                     [sampling.prompt_seed(i) for i in range(len(rows))],
                                                     ["</answer>"], False))
    sampler._score(list(rows), gen)
    seq_s = time.perf_counter() - t0
    seq_tokens = sum(len(c.token_ids) for group in gen for c in group)
    sampler.shutdown()

    raw_tps, rs_tps, seq_tps = statistics.median(raw_runs), statistics.median(rs_runs), seq_tokens / seq_s
    ratio = statistics.median(ratios)
    print(f"raw engine generate      : {raw_tokens} tokens, median {raw_tps:.0f} tok/s")
    print(f"rejection sampling       : {tokens} tokens, median {rs_tps:.0f} tok/s (scored + judged) -> "
          f"median ratio {ratio:.2f}x raw over {args.repeats} alternating repeats")
    print(f"generate, then score     : {seq_tokens} tokens in {seq_s:.1f} s = {seq_tps:.0f} tok/s -> {seq_tps / raw_tps:.2f}x raw")
    print(json.dumps({"bench": "rejection_sampling", "prompts": len(rows), "k": args.k, "max_tokens": args.max_tokens,
                      "code_share": args.code_share, "repeats": args.repeats,
                      "raw_tokens_per_s": round(raw_tps, 1), "rs_tokens_per_s": round(rs_tps, 1),
                      "sequential_tokens_per_s": round(seq_tps, 1), "ratio_vs_raw": round(ratio, 3),
                      "ratios": [round(r, 3) for r in ratios], "ratio_sequential_vs_raw": round(seq_tps / raw_tps, 3)}))

if __name__ == "__main__":
    main()
