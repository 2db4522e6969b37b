"""PNG plots of a run's curves (from metrics.jsonl) and of distributions.

Figures are made with matplotlib's object API (`Figure`, rendered by Agg), never pyplot: no display
is needed and no global backend state is touched.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

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
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
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
        written.append(path)
    return written


def plot_histograms(series: dict[str, list[float]], path: str | Path, xlabel: str, ylabel: str = "count") -> Path:
    """One PNG with a histogram per labelled series (shared bins; the count is in the legend)."""
    values = [v for vs in series.values() for v in vs]
    bins = max(10, min(50, len(set(values))))
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for i, (label, vs) in enumerate(series.items()):
        ax.hist(vs, bins=bins, alpha=0.5 if i == 0 else 0.7, label=f"{label} ({len(vs)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
