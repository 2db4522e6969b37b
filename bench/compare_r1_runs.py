"""R1 vs R1-Zero on the tiny world, side by side: the scorecards of two run directories.

    r1pipe run r1 --run-dir runs/r1
    r1pipe run r1 run.name=r1-zero-same-base "stages=[pretrain,zero_rl,scorecard]" --run-dir runs/r1-zero-same-base
    python bench/compare_r1_runs.py runs/r1 runs/r1-zero-same-base --png docs/img/r1_vs_r1zero.png

Prints a markdown table (held-out accuracy per domain, format compliance, summary share, language
consistency, mixed-script share, mean length, per stage of both runs), the final models compared
problem by problem (per domain: solved by R1 only, by R1-Zero only, and the exact two-sided sign-test
p-value of that split, i.e. McNemar's exact test; from the scorecards' answer files), and writes one
PNG; last line JSON.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

FIGURES = ("format_compliance", "summary_share", "language_consistency", "mixed_script_share", "mean_length")


def scorecard(run_dir: Path) -> dict[str, dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    order = [s for s in summary["stages"] if s in summary.get("per_stage", {})]
    return {s: summary["per_stage"][s] for s in order}


def answers(run_dir: Path, stage: str) -> dict[str, dict]:
    """The scorecard's answers of one stage's model, by row id ({} for a scorecard without them)."""
    path = run_dir / "scorecard" / f"{stage}.answers.jsonl"
    if not path.exists():
        return {}
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of `wins` against `losses` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n)


def paired(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Per domain, over the problems both answered: solved by `a` only, by `b` only, and the p-value."""
    out: dict[str, dict] = {}
    for rid in sorted(a.keys() & b.keys()):
        d = out.setdefault(a[rid]["domain"], {"n": 0, "first_only": 0, "second_only": 0})
        d["n"] += 1
        d["first_only"] += int(a[rid]["solved"] and not b[rid]["solved"])
        d["second_only"] += int(b[rid]["solved"] and not a[rid]["solved"])
    for d in out.values():
        d["p_value"] = round(sign_test(d["first_only"], d["second_only"]), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("r1", type=Path)
    ap.add_argument("r1_zero", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="where the PNG goes (default: <r1>/r1_vs_r1zero.png)")
    args = ap.parse_args()
    args.png = args.png or args.r1 / "r1_vs_r1zero.png"  # beside the run, never in the working tree
    runs = {"R1": scorecard(args.r1), "R1-Zero": scorecard(args.r1_zero)}
    domains = sorted({d for card in runs.values() for row in card.values() for d in row["accuracy"]})
    head = ["run", "stage", *[f"{d} accuracy" for d in domains], *FIGURES]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for run, card in runs.items():
        for stage, row in card.items():
            cells = [run, stage, *[f"{row['accuracy'].get(d, float('nan')):.1%}" for d in domains],
                     *[f"{row[k]:.1f}" if k == "mean_length" else f"{row.get(k, float('nan')):.1%}" for k in FIGURES]]
            print("| " + " | ".join(cells) + " |")

    final = {run: list(card.values())[-1] for run, card in runs.items()}
    last = {run: list(card)[-1] for run, card in runs.items()}
    pairs = paired(answers(args.r1, last["R1"]), answers(args.r1_zero, last["R1-Zero"]))
    for d, p in pairs.items():
        print(f"{d}: {p['n']} problems; solved by R1 only {p['first_only']}, by R1-Zero only {p['second_only']} "
              f"(sign test p = {p['p_value']:.3g})")
    labels = [*[f"{d}\naccuracy" for d in domains], "format\ncompliance", "closing\nsummary", "language\nconsistency",
              "mixed\nscripts"]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    width = 0.38
    for i, (run, row) in enumerate(final.items()):
        values = [*[row["accuracy"].get(d, 0.0) for d in domains], row["format_compliance"], row.get("summary_share", 0.0),
                  row["language_consistency"], row["mixed_script_share"]]
        axes[0].bar([x + (i - 0.5) * width for x in range(len(values))], values, width, label=f"{run} (final)")
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out, greedy: final models")
    axes[0].legend()
    for run, card in runs.items():
        for d in domains:
            axes[1].plot(list(card), [row["accuracy"].get(d, 0.0) for row in card.values()], marker="o", label=f"{run}: {d}")
    axes[1].set_title("held-out accuracy after each stage")
    axes[1].set_ylim(0, 1.05)
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(json.dumps({"r1_final": final["R1"], "r1_zero_final": final["R1-Zero"], "paired": pairs, "png": str(args.png)}))


if __name__ == "__main__":
    main()
