"""Evaluation outputs: `report.json` (machine-readable), `report.md` (for people), the console table
(rich), and `generations.jsonl` (every sample with its extracted answer and score; its `id` and
`response` fields make it a valid `--responses` file, so a run can be re-scored later, and
`problem_scores` reads its per-problem scores back for paired comparisons)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

METRIC_COLUMNS = ("pass@1", "cons@k", "pass@k")


@dataclass
class SuiteResult:
    name: str
    kind: str
    n_problems: int
    k: int  # samples per problem (the fewest, when saved responses are uneven)
    metrics: dict[str, float]  # pass@1, pass@k, cons@k (math), pass@j for requested j
    n_samples: int = 0
    skipped_rows: int = 0  # malformed suite rows
    missing: int = 0  # problems with no saved response (responses mode)
    unknown_ids: int = 0  # saved responses whose id is not in the suite
    grader_errors: int = 0
    generate_s: float = 0.0
    grade_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The report.json entry: n_problems, k, the metrics, then the bookkeeping."""
        entry: dict[str, Any] = {"n_problems": self.n_problems, "k": self.k}
        entry.update(self.metrics)
        entry.update({key: value for key, value in asdict(self).items() if key not in ("name", "n_problems", "k", "metrics")})
        return entry


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def append_generations(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def problem_scores(path: Path, suite: str) -> dict[str, float]:
    """Per problem of `suite` in a generations.jsonl, the mean score over its samples (the problem's share
    of pass@1), by problem id in file order."""
    scores: dict[str, list[float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("suite") == suite:
                    scores.setdefault(str(row["id"]), []).append(float(row["score"]))
    return {pid: sum(values) / len(values) for pid, values in scores.items()}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(results: list[SuiteResult], meta: dict[str, Any]) -> str:
    lines = ["# r1pipe eval", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items() if not isinstance(value, dict)]
    lines += ["", "| suite | problems | k | " + " | ".join(METRIC_COLUMNS) + " |", "|---|---:|---:|" + "---:|" * len(METRIC_COLUMNS)]
    for r in results:
        cells = [fmt(r.metrics.get(c)) for c in METRIC_COLUMNS]
        lines.append(f"| {r.name} | {r.n_problems} | {r.k} | " + " | ".join(cells) + " |")
    lines += ["", "Scores in percent. pass@1: mean over the k samples; cons@k: majority vote over extracted answers; "
              "pass@k: unbiased estimator (Chen et al., 2021)."]
    for r in results:
        extra = [f"{key} {fmt(value)}" for key, value in r.metrics.items() if key not in METRIC_COLUMNS]
        counts = [f"{name} {getattr(r, name)}" for name in ("skipped_rows", "missing", "unknown_ids", "grader_errors") if getattr(r, name)]
        if extra or counts or r.notes:
            lines.append(f"- {r.name}: " + "; ".join(extra + counts + r.notes))
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: list[SuiteResult], meta: dict[str, Any]) -> dict[str, Any]:
    report = {"suites": {r.name: r.summary() for r in results}, **meta}
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "report.md", markdown(results, meta))
    return report


def print_table(results: list[SuiteResult], title: str = "r1pipe eval") -> None:
    table = Table(title=title)
    table.add_column("suite")
    for column in ("problems", "k", *METRIC_COLUMNS):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.name, str(r.n_problems), str(r.k), *(fmt(r.metrics.get(c)) for c in METRIC_COLUMNS))
    Console().print(table)
