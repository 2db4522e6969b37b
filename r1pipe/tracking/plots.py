"""PNG plots of a run's curves from metrics.jsonl (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from r1pipe.tracking.logger import read_metrics

# one figure per entry: file stem -> (title, metric keys drawn on it)
DEFAULT_PLOTS: dict[str, tuple[str, list[str]]] = {
    "reward": ("reward", ["reward/mean", "reward/accuracy", "reward/format"]),
    "accuracy": ("accuracy", ["accuracy", "heldout_accuracy"]),
    "response_length": ("mean response length (tokens)", ["response_length/mean"]),
    "kl": ("KL to reference (k3)", ["kl"]),
    "entropy": ("entropy", ["entropy"]),
    "clip_fraction": ("clip fraction", ["clip_fraction"]),
}


def plot_metrics(metrics_path: str | Path, out_dir: str | Path, plots: dict[str, tuple[str, list[str]]] | None = None) -> list[Path]:
    """Draw each figure whose keys appear in the log; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, keys) in (plots or DEFAULT_PLOTS).items():
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                series[key] = points
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 3 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
