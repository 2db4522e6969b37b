"""R1 vs R1-Zero on the tiny world over seeds: the scorecards of paired run directories.

    for s in 0 1 2; do
      r1pipe run r1 run.seed=$s --run-dir runs/r1-s$s
      r1pipe run r1 run.seed=$s "stages=[pretrain,zero_rl,scorecard]" --run-dir runs/r1-zero-s$s
    done
    python bench/compare_r1_runs.py --r1 runs/r1-s0 runs/r1-s1 runs/r1-s2 \
        --r1-zero runs/r1-zero-s0 runs/r1-zero-s1 runs/r1-zero-s2 --png docs/img/r1_vs_r1zero.png

The i-th R1 run is paired with the i-th R1-Zero run (their run.seed must agree). Everything is read
from the runs' outputs (summary.json `per_stage`, `scorecard/<stage>.answers.jsonl`); nothing is typed
in. Prints markdown tables: every stage of every run (held-out accuracy per domain with its Wilson 95%
interval, format compliance, closing-summary share, language consistency, mixed-script share, mean
length); the final models paired problem by problem, per seed and over all seeds (difference R1 -
R1-Zero with a paired 95% interval, solved by one only, the exact sign test, i.e. McNemar's exact
test); and, per domain, each R1 run's all-scenario RL against the SFT model it starts from (the same
paired figures). Writes one PNG; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from r1pipe.eval.stats import paired_comparison, wilson_interval

FIGURES = {"format_compliance": "format", "summary_share": "closing summary", "language_consistency": "language consistency",
           "mixed_script_share": "mixed scripts", "mean_length": "mean length (tokens)"}


class Run:
    """One run directory: its seed, its stages' scorecard rows (in stage order) and their answers."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        summary = json.loads((run_dir / "summary.json").read_text())
        self.seed = int(OmegaConf.load(run_dir / "config.yaml").run.seed)
        self.card = {s: summary["per_stage"][s] for s in summary["stages"] if s in summary.get("per_stage", {})}
        if not self.card:
            raise SystemExit(f"{run_dir}: no scorecard in summary.json (per_stage); did the run finish?")
        self.final = list(self.card)[-1]

    def answers(self, stage: str) -> dict[str, dict]:
        """The stage model's scorecard answers, by row id."""
        path = self.dir / "scorecard" / f"{stage}.answers.jsonl"
        return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def paired_by_domain(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Per domain, over the problems both answered: `paired_comparison` of solved(a) against solved(b)."""
    common = sorted(a.keys() & b.keys())
    domains = sorted({a[r]["domain"] for r in common})
    return {d: paired_comparison([float(a[r]["solved"]) for r in common if a[r]["domain"] == d],
                                 [float(b[r]["solved"]) for r in common if a[r]["domain"] == d]) for d in domains}


def pooled(pairs: list[tuple[dict[str, dict], dict[str, dict]]]) -> dict[str, dict]:
    """`paired_by_domain` over all seeds at once (a seed's row ids are prefixed with its index)."""
    a = {f"{i}/{r}": row for i, (x, _) in enumerate(pairs) for r, row in x.items()}
    b = {f"{i}/{r}": row for i, (_, y) in enumerate(pairs) for r, row in y.items()}
    return paired_by_domain(a, b)


def accuracy_cell(row: dict, domain: str) -> str:
    acc, n = row["accuracy"].get(domain), row.get("n", {}).get(domain)
    if acc is None:
        return "-"
    if not n:
        return f"{acc:.1%}"
    low, high = wilson_interval(round(acc * n), n)
    return f"{acc:.1%} [{low:.1%}, {high:.1%}]"


def paired_cell(p: dict) -> str:
    return (f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]; "
            f"{p['a_only']} vs {p['b_only']}, p = {p['p_value']:.2g}")


def stage_table(runs: dict[str, Run], domains: list[str]) -> str:
    head = ["run", "seed", "stage", *[f"{d} accuracy [95%]" for d in domains], *FIGURES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, run in runs.items():
        for stage, row in run.card.items():
            cells = [label, str(run.seed), stage, *[accuracy_cell(row, d) for d in domains],
                     *[f"{row[k]:.1f}" if k == "mean_length" else f"{row.get(k, float('nan')):.1%}" for k in FIGURES]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, r1: list[Run], zero: list[Run], domains: list[str]) -> None:
    """Left: the final models (mean over seeds, each seed a dot); right: accuracy after each stage, per seed."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    labels = [*[f"{d}\naccuracy" for d in domains], "format\ncompliance", "closing\nsummary", "language\nconsistency",
              "mixed\nscripts"]
    keys = ["format_compliance", "summary_share", "language_consistency", "mixed_script_share"]
    width = 0.38
    for i, (name, runs) in enumerate((("R1", r1), ("R1-Zero", zero))):
        per_seed = [[*[r.card[r.final]["accuracy"].get(d, 0.0) for d in domains],
                     *[r.card[r.final].get(k, 0.0) for k in keys]] for r in runs]
        xs = [x + (i - 0.5) * width for x in range(len(labels))]
        means = [sum(col) / len(col) for col in zip(*per_seed)]
        axes[0].bar(xs, means, width, label=f"{name} (final, mean of {len(runs)} seeds)")
        for values in per_seed:
            axes[0].plot(xs, values, "k.", markersize=4)
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out, greedy: final models")
    axes[0].legend(fontsize=8)
    for name, runs, style in (("R1", r1, "-"), ("R1-Zero", zero, "--")):
        for run in runs:
            for j, d in enumerate(domains):
                axes[1].plot(list(run.card), [row["accuracy"].get(d, 0.0) for row in run.card.values()], style, marker="o",
                             color=f"C{j}", alpha=0.8, label=f"{name}: {d}" if run is runs[0] else None)
    axes[1].set_title("held-out accuracy after each stage (one line per seed)")
    axes[1].set_ylim(0, 1.05)
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r1", type=Path, nargs="+", required=True, help="R1 run directories, one per seed")
    ap.add_argument("--r1-zero", type=Path, nargs="+", required=True, help="R1-Zero run directories, in the same seed order")
    ap.add_argument("--png", type=Path, default=None, help="where the PNG goes (default: <first R1 run>/r1_vs_r1zero.png)")
    ap.add_argument("--sft-stage", default="sft", help="the R1 stage all-scenario RL starts from (default: sft)")
    args = ap.parse_args()
    if len(args.r1) != len(args.r1_zero):
        raise SystemExit(f"{len(args.r1)} R1 runs but {len(args.r1_zero)} R1-Zero runs: pair them by seed")
    r1, zero = [Run(d) for d in args.r1], [Run(d) for d in args.r1_zero]
    for a, b in zip(r1, zero):
        if a.seed != b.seed:
            raise SystemExit(f"{a.dir} has run.seed={a.seed} but its pair {b.dir} has run.seed={b.seed}")
    domains = sorted({d for run in r1 + zero for row in run.card.values() for d in row["accuracy"]})

    print(stage_table({**{f"R1 {r.dir.name}": r for r in r1}, **{f"R1-Zero {r.dir.name}": r for r in zero}}, domains))
    finals = [(a.answers(a.final), b.answers(b.final)) for a, b in zip(r1, zero)]
    versus = {f"seed {a.seed}": paired_by_domain(x, y) for a, (x, y) in zip(r1, finals)}
    versus["all seeds"] = pooled(finals)
    print("\nFinal models, R1 - R1-Zero, paired per problem (points [95% interval]; solved by R1 only vs R1-Zero only, "
          "exact sign test):\n")
    print("| seeds | " + " | ".join(domains) + " |\n|" + "---|" * (len(domains) + 1))
    for label, by_domain in versus.items():
        print(f"| {label} | " + " | ".join(paired_cell(by_domain[d]) if d in by_domain else "-" for d in domains) + " |")

    rl_steps = {}
    for a in r1:
        if args.sft_stage in a.card and a.final != args.sft_stage:
            rl_steps[f"seed {a.seed}"] = paired_by_domain(a.answers(a.final), a.answers(args.sft_stage))
    if rl_steps:
        print(f"\nR1's last stage against its {args.sft_stage} model (points [95% interval]; solved after only vs before only):\n")
        print("| seed | " + " | ".join(domains) + " |\n|" + "---|" * (len(domains) + 1))
        for label, by_domain in rl_steps.items():
            print(f"| {label} | " + " | ".join(paired_cell(by_domain[d]) if d in by_domain else "-" for d in domains) + " |")

    png = args.png or args.r1[0] / "r1_vs_r1zero.png"  # beside the run, never in the working tree
    plot(png, r1, zero, domains)
    print(json.dumps({"r1_final": {r.seed: r.card[r.final] for r in r1}, "r1_zero_final": {r.seed: r.card[r.final] for r in zero},
                      "paired": versus, "last_rl_vs_sft": rl_steps, "png": str(png)}))


if __name__ == "__main__":
    main()
