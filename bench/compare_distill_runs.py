"""The distill recipe over seeds: each run's comparison (compare/comparison.json) side by side.

    for s in 0 1 2; do r1pipe run distill run.seed=$s --run-dir runs/distill-s$s; done
    python bench/compare_distill_runs.py runs/distill-s0 runs/distill-s1 runs/distill-s2

Prints markdown read from the runs' outputs only: held-out pass@1 of every row per seed (with its Wilson 95%
interval) and the mean over seeds; each margin per seed (paired difference with its 95% interval, sign test)
and its mean; each budget check (RL alone against SFT: optimizer steps and tokens) per seed. Draws one PNG;
the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf


def load(run_dir: Path) -> tuple[int, dict]:
    seed = int(OmegaConf.load(run_dir / "config.yaml").run.seed)
    return seed, json.loads((run_dir / "compare" / "comparison.json").read_text())


def points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="finished distill run directories, one per seed")
    ap.add_argument("--png", type=Path, default=None, help="default: <first run>/distill_seeds.png")
    args = ap.parse_args()
    runs = dict(load(d) for d in args.runs)
    seeds = list(runs)
    labels = list(next(iter(runs.values()))["rows"])

    print("| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n|" + "---|" * (len(seeds) + 2))
    means = {}
    for label in labels:
        values = [runs[s]["rows"][label]["pass@1"] for s in seeds]
        means[label] = sum(values) / len(values)
        cells = [f"{v:.1%} [{r['pass@1_interval'][0]:.1%}, {r['pass@1_interval'][1]:.1%}]"
                 for v, r in zip(values, (runs[s]["rows"][label] for s in seeds))]
        print(f"| {label} | " + " | ".join(cells) + f" | **{means[label]:.1%}** |")

    margins: dict[str, list[dict]] = {}
    for s in seeds:
        for m in runs[s]["margins"]:
            margins.setdefault(f"{m['a']} - {m['b']}", []).append(m)
    print("\n| margin (points, paired over held-out problems) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n|"
          + "---|" * (len(seeds) + 2))
    for name, per_seed in margins.items():
        cells = [f"{points(m['difference'])} [{points(m['low'])}, {points(m['high'])}], p = {m['p_value']:.2g}" for m in per_seed]
        print(f"| {name} | " + " | ".join(cells) + f" | **{points(sum(m['difference'] for m in per_seed) / len(per_seed))}** |")

    print("\n| budget: RL alone vs SFT | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|" + "---|" * (len(seeds) + 1))
    checks: dict[str, list[dict]] = {}
    for s in seeds:
        for b in runs[s]["budgets"]:
            checks.setdefault(f"{b['rl']} vs {b['sft']}", []).append(b)
    for name, per_seed in checks.items():
        cells = [f"steps {b['rl_optimizer_steps']} vs {b['sft_optimizer_steps']}, tokens {b['rl_tokens']:,} vs {b['sft_tokens']:,}"
                 f" ({'holds' if b['holds'] else 'DOES NOT HOLD'})" for b in per_seed]
        print(f"| {name} | " + " | ".join(cells) + " |")

    png = args.png or args.runs[0] / "distill_seeds.png"
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    for i, label in enumerate(labels):
        ax.bar(i, means[label], color="C0" if "distilled" in label else "C1" if "RL" in label else "C7")
        ax.plot([i] * len(seeds), [runs[s]["rows"][label]["pass@1"] for s in seeds], "k.")
    ax.set_xticks(range(len(labels)), [label.replace(" (", "\n(") for label in labels], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out pass@1 (greedy)")
    ax.set_title(f"distillation vs RL alone, mean of {len(seeds)} seeds (dots: each seed)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(json.dumps({"seeds": seeds, "mean_pass@1": means, "margins": margins, "budgets": checks, "png": str(png)}))


if __name__ == "__main__":
    main()
