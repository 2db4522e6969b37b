"""MTP self-speculation acceptance over GRPO training, with and without the draft loss.

Pre-trains the tiny R1-Zero base once (the `r1-zero` recipe's pretrain stage, reused from the base
cache when it is there), then runs the recipe's GRPO stage twice from it with the engine drafting
`speculative_k` tokens per step from the MTP module: once with `rl.algorithm.draft_loss=true` (the default when
speculative_k > 0; it trains the drafter at every chained depth the engine drafts) and once with it
off. The engine's acceptance rate on each step's rollouts is logged as `mtp/acceptance` (all drafts),
`mtp/acceptance_first` (the first draft of each step) and `mtp/acceptance_chained` (the later ones);
this prints each at the first step (the base's drafter) and over the last 5 steps of each run.
Last line: JSON.

    python bench/bench_mtp_drafter.py [--steps 50] [--speculative-k 2] [--lr 1e-3] [--draft-lr-scale 10] [--out /tmp/mtp_bench]
    python bench/bench_mtp_drafter.py --recipe r1-zero-tiny --pretrain-steps 150   # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def r1pipe(recipe: str, *args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "r1pipe.cli", "run", recipe, *args], cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--speculative-k", type=int, default=2)
    ap.add_argument("--recipe", default="r1-zero", help="whose pretrain and rl stages run (default: the main tiny recipe)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="pretrain.steps (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="rl.optim.lr (default: the recipe's)")
    ap.add_argument("--draft-lr-scale", type=float, default=None, help="rl.algorithm.draft_lr_scale for the draft-loss run (default: the recipe's)")
    ap.add_argument("--out", default="/tmp/r1pipe_mtp_bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "pretrain" / "DONE.json").exists():
        r1pipe(args.recipe, "stages=[pretrain]", *([f"pretrain.steps={args.pretrain_steps}"] if args.pretrain_steps else []),
               "--run-dir", str(base), cwd=out)
    pre = json.loads((base / "pretrain" / "DONE.json").read_text())
    result = {}
    for draft in (True, False):
        run_dir = out / f"rl_draft_{str(draft).lower()}"
        r1pipe(args.recipe, "stages=[rl]", f"model.path={pre['model_path']}", f"rl.data.train_path={pre['train_path']}",
               f"rl.data.heldout_path={pre['heldout_path']}", f"rl.steps={args.steps}", f"rl.checkpoint.every={args.steps}",
               f"rl.rollout.engine.speculative_k={args.speculative_k}", f"rl.algorithm.draft_loss={str(draft).lower()}",
               *([f"rl.optim.lr={args.lr}"] if args.lr else []),
               *([f"rl.algorithm.draft_lr_scale={args.draft_lr_scale}"] if args.draft_lr_scale and draft else []),
               "--run-dir", str(run_dir), cwd=out)
        rows = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
        run = {}
        for key in ("acceptance", "acceptance_first", "acceptance_chained"):
            acc = [r[f"mtp/{key}"] for r in rows if f"mtp/{key}" in r]
            if acc:
                start, end = acc[0], sum(acc[-5:]) / len(acc[-5:])
                run[key] = {"step_1": round(start, 4), "last_5_mean": round(end, 4), "change_points": round(100 * (end - start), 1)}
                print(f"draft loss {'on ' if draft else 'off'}: MTP {key.replace('_', ' ')} {start:.1%} at step 1 -> "
                      f"{end:.1%} over the last 5 of {len(acc)} steps ({100 * (end - start):+.1f} points)")
        result[f"draft_loss_{'on' if draft else 'off'}"] = run
    print(json.dumps({"bench": "mtp_drafter", "recipe": args.recipe, "steps": args.steps, "speculative_k": args.speculative_k, "lr": args.lr,
                      "draft_lr_scale": args.draft_lr_scale,
                      **result}))


if __name__ == "__main__":
    main()
