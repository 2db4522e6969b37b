"""The learning rate of an RL stage, chosen on the validation split: one run of the stage per rate.

Each run is `r1pipe run RECIPE "stages=[...,BASE,STAGE]" STAGE.optim.lr=LR` (the stage and the stages it
names through `stage:` references) in its own process (its own Ray instance), from the same cached base,
with the stage's own settings otherwise. The stage's held-out
check must read the base's validation split (`STAGE.data.heldout_path: stage:BASE.valid_path`, as the
distill recipe's RL-alone stages do), never its test split: the sweep refuses otherwise. Prints the
whole sweep (validation accuracy with its Wilson 95% interval, the base's, the stage's seconds) and the best rate,
plots validation accuracy against the rate; the last line is JSON. A rate whose run directory has finished
is read back, not rerun, so a sweep can be widened by naming more rates.

    python bench/sweep_rl_lr.py --stage rl_v3 --lrs 3e-5 1e-4 3e-4 1e-3
    python bench/sweep_rl_lr.py --stage rl_qwen --lrs 3e-5 1e-4 3e-4 1e-3 run.seed=0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

from r1pipe.config import STAGE_REF, load_recipe, stage_config, stage_refs
from r1pipe.eval.stats import wilson_interval


def stages_for(recipe: str, stage: str, overrides: list[str]) -> list[str]:
    """The stage and every stage it needs (through stage: references), in the recipe's order."""
    cfg = load_recipe(recipe, overrides)
    needed, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(ref for _, _, ref in stage_refs(stage_config(cfg, name), name))
    return [name for name in cfg.stages if name in needed]


def base_of(recipe: str, stage: str, overrides: list[str]) -> str:
    """The stage whose base model and validation split the RL stage reads (refusing any other held-out set)."""
    cfg = load_recipe(recipe, overrides)
    section = cfg.get(stage)
    if section is None or section.get("kind") != "grpo":
        raise SystemExit(f"{recipe}: no grpo stage {stage!r}")
    model, heldout = str(section.get("model_path") or ""), str(section.data.get("heldout_path") or "")
    ref = STAGE_REF.match(model)
    base = ref.group(1) if ref else None
    if base is None or heldout != f"stage:{base}.valid_path":
        raise SystemExit(f"{stage}.data.heldout_path={heldout or None!r}: the sweep scores on the validation split; "
                         f"set it to stage:<base>.valid_path (model_path={model or None!r})")
    return base


def run(recipe: str, stages: list[str], stage: str, lr: float, overrides: list[str], out: Path) -> dict:
    run_dir = out / f"{stage}-lr{lr:g}"
    cmd = [sys.executable, "-m", "r1pipe.cli", "run", recipe, f"stages=[{','.join(stages)}]", f"{stage}.optim.lr={lr}",
           *overrides, "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # a finished run directory is reused as is
    summary = json.loads((run_dir / stage / "summary.json").read_text())
    n, acc = summary["heldout_size"], summary["final_accuracy"]
    low, high = wilson_interval(round(acc * n), n)
    return {"lr": lr, "validation_accuracy": acc, "low": low, "high": high, "n": n, "base_accuracy": summary["base_accuracy"],
            "steps": summary["steps"], "wall_s": round(summary["wall_seconds"], 1), "run_dir": str(run_dir)}


def plot(results: list[dict], stage: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    xs = [r["lr"] for r in results]
    ax.errorbar(xs, [r["validation_accuracy"] for r in results],
                yerr=[[r["validation_accuracy"] - r["low"] for r in results], [r["high"] - r["validation_accuracy"] for r in results]],
                marker="o", capsize=3, label=f"{stage} after {results[0]['steps']} steps")
    ax.axhline(results[0]["base_accuracy"], color="gray", linestyle="--", label="its base")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy (greedy)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every run (key=value)")
    ap.add_argument("--recipe", default="distill")
    ap.add_argument("--stage", required=True, help="the grpo stage swept, e.g. rl_v3")
    ap.add_argument("--lrs", type=float, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--png", type=Path, default=None, help="default: OUT/<stage>_lr.png")
    args = ap.parse_args()
    base = base_of(args.recipe, args.stage, args.overrides)
    stages = stages_for(args.recipe, args.stage, args.overrides)
    results = []
    for lr in args.lrs:
        results.append(run(args.recipe, stages, args.stage, lr, args.overrides, args.out))
        r = results[-1]
        print(f"{args.stage} lr={lr:g}: validation {r['validation_accuracy']:.1%} (base {r['base_accuracy']:.1%}), {r['wall_s']:.0f}s",
              flush=True)
    best = max(results, key=lambda r: r["validation_accuracy"])  # ties: the first rate listed
    print(f"\n| {args.stage} lr | validation accuracy [95%] | base | steps | seconds |\n|---|---|---|---|---|")
    for r in results:
        mark = " (best)" if r is best else ""
        print(f"| {r['lr']:g}{mark} | {r['validation_accuracy']:.1%} [{r['low']:.1%}, {r['high']:.1%}] of {r['n']} | "
              f"{r['base_accuracy']:.1%} | {r['steps']} | {r['wall_s']:.0f} |")
    png = args.png or args.out / f"{args.stage}_lr.png"
    plot(results, args.stage, png)
    print(json.dumps({"stage": args.stage, "base": base, "best_lr": best["lr"], "sweep": results, "png": str(png)}))


if __name__ == "__main__":
    main()
