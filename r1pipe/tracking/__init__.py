"""Run tracking: metrics.jsonl, TensorBoard events, PNG plots of the curves, console progress."""
from r1pipe.tracking.logger import MetricsLogger, read_metrics
from r1pipe.tracking.plots import plot_metrics
from r1pipe.tracking.progress import StepProgress

__all__ = ["MetricsLogger", "StepProgress", "plot_metrics", "read_metrics"]
