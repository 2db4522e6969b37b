"""The GRPO family on the R1-Zero recipe: one 100-step run per setting, from the same cached base.

Each run is `r1pipe run r1-zero "stages=[pretrain,rl]"` with one setting changed (rl.algorithm.loss, rl.algorithm.advantage or
rl.rollout.max_staleness) and held-out accuracy every 10 steps; the table gives held-out accuracy at steps 20, 50
and 100 and the median seconds per step, the plot the held-out curves. Runs go one after another, each
in its own process (its own Ray instance).

    python bench/bench_algorithms.py                           # all settings, ~2 minutes each on 2 cores
    python bench/bench_algorithms.py --only grpo-x4 gspo-x4 cispo-x4   # the surrogates off-policy
    python bench/bench_algorithms.py --only grpo async --steps 100
    python bench/bench_algorithms.py --only grpo async --seeds 3   # seeds 0, 1, 2 (each its own base): means and
                                                                   # each setting's paired gap to the first
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

# name -> the overrides that make it (everything else is the r1-zero recipe: GRPO advantages, GRPO loss, sync)
SETTINGS: dict[str, list[str]] = {
    "grpo": [],
    "gspo": ["rl.algorithm.loss=gspo", "rl.algorithm.loss_agg=seq-mean-token-mean", "rl.algorithm.clip_low=0.0003", "rl.algorithm.clip_high=0.0004"],
    "cispo": ["rl.algorithm.loss=cispo", "rl.algorithm.clip_low=1.0", "rl.algorithm.clip_high=0.28"],
    "dr-grpo": ["rl.algorithm.advantage=dr-grpo", "rl.algorithm.loss_agg=seq-mean-token-sum-norm"],
    "rloo": ["rl.algorithm.advantage=rloo"],
    "reinforce++": ["rl.algorithm.advantage=reinforce++"],
    "async": ["rl.rollout.max_staleness=1"],
    # one update per batch is on-policy (ratio 1): there grpo, gspo and cispo give one gradient; four mini-batch
    # updates per batch take the later ones off-policy, where the surrogates differ
    "grpo-x4": ["rl.algorithm.updates_per_step=4"],
    "gspo-x4": ["rl.algorithm.updates_per_step=4", "rl.algorithm.loss=gspo", "rl.algorithm.loss_agg=seq-mean-token-mean", "rl.algorithm.clip_low=0.0003",
                "rl.algorithm.clip_high=0.0004"],
    "cispo-x4": ["rl.algorithm.updates_per_step=4", "rl.algorithm.loss=cispo", "rl.algorithm.clip_low=1.0", "rl.algorithm.clip_high=0.28"],
}
CHECKPOINTS = (20, 50, 100)


def run(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "r1pipe.cli", "run", "r1-zero", "stages=[pretrain,rl]", f"rl.steps={steps}",
           "rl.data.eval_every=10", *overrides, "--run-dir", str(run_dir)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    heldout = {r["step"]: r["heldout_accuracy"] for r in rows if "heldout_accuracy" in r}
    steps_s = [r["time/step"] for r in rows if "time/step" in r][1:]
    return {"setting": name, "overrides": overrides, "heldout": heldout, "s_per_step": statistics.median(steps_s),
            "staleness_max": max((r.get("staleness/max", 0.0) for r in rows), default=0.0), "wall_s": round(wall, 1)}


def plot(results: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in results:
        points = sorted((int(k), v) for k, v in r["heldout"].items())
        ax.plot([s for s, _ in points], [100 * v for _, v in points], label=r["setting"])
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("R1-Zero on the tiny base: the GRPO family")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def print_seed_means(results: list[dict], names: list[str], last: int) -> None:
    """Each setting's mean held-out accuracy over the seeds at every checkpoint, and its per-seed gap to the first
    setting at the last step (paired: the same seed is the same base)."""
    by = {(r["name"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    first = names[0]
    print(f"\n| setting | mean held-out at 20 | 50 | {last} | gap to {first} at {last}, per seed | mean gap | s/step |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        means = [statistics.mean(by[name, s]["heldout"].get(c, float("nan")) for s in seeds) for c in (20, 50, last)]
        gaps = [by[name, s]["heldout"].get(last, float("nan")) - by[first, s]["heldout"].get(last, float("nan"))
                for s in seeds]
        print(f"| {name} | " + " | ".join(f"{100 * m:.1f}%" for m in means)
              + f" | {', '.join(f'{100 * g:+.1f}' for g in gaps)} | {100 * statistics.mean(gaps):+.1f} | "
              + f"{statistics.median(by[name, s]['s_per_step'] for s in seeds):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value",
                   help="overrides for every setting, e.g. run.seed=1 (another base)")
    p.add_argument("--seeds", type=int, default=1, help="run every setting with run.seed 0..N-1 (N bases)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/algorithms"))
    p.add_argument("--png", type=Path, default=Path("runs/bench/algorithms.png"))
    args = p.parse_args()
    results = []
    for seed in range(args.seeds):
        for name in args.only:
            label = name if args.seeds == 1 else f"{name} seed {seed}"
            extra = args.extra if args.seeds == 1 else [*args.extra, f"run.seed={seed}"]
            print(f"{label}: {' '.join(SETTINGS[name] + extra) or '(the recipe)'}", flush=True)
            results.append({**run(name if args.seeds == 1 else f"{name}-seed{seed}", SETTINGS[name] + extra, args.steps,
                                  args.out), "setting": label, "name": name, "seed": seed})
            r = results[-1]
            shares = " / ".join(f"{100 * r['heldout'].get(s, float('nan')):.1f}%" for s in CHECKPOINTS)
            print(f"  held-out {shares} at steps {' / '.join(map(str, CHECKPOINTS))}, {r['s_per_step']:.3f} s/step, "
                  f"{r['wall_s']:.0f} s in all", flush=True)
    print("\n| setting | held-out at step 0 | 20 | 50 | 100 | s/step |\n|---|---|---|---|---|---|")
    for r in results:
        cells = " | ".join(f"{100 * r['heldout'][s]:.1f}%" if s in r["heldout"] else "-" for s in (0, *CHECKPOINTS))
        print(f"| {r['setting']} | {cells} | {r['s_per_step']:.3f} |")
    if args.seeds > 1:
        print_seed_means(results, args.only, args.steps)
    plot(results, args.png)
    print(f"plot: {args.png}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
