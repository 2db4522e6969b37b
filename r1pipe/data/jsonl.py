"""JSON-lines files: tolerant reading (a malformed or blank line is skipped and counted, never fatal)
and atomic writing."""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass
class SkipReport:
    """Rows kept and rows skipped, counted by reason, with the first few places for each reason."""

    kept: int = 0
    truncated: int = 0  # kept rows cut to fit (SFT with truncate)
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < 3:
            places.append(f"{where}{': ' + detail if detail else ''}")

    def summary(self) -> str:
        """'kept 95, skipped 5: 3 not JSON (line 4; ...), 2 empty prompt (row 7; ...)'."""
        text = f"kept {self.kept}" + (f" ({self.truncated} truncated to fit)" if self.truncated else "")
        text += f", skipped {self.skipped}"
        if self.skipped:
            parts = [f"{n} {reason} ({'; '.join(self.examples[reason])})" for reason, n in self.reasons.most_common()]
            text += ": " + ", ".join(parts)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": self.skipped, "reasons": dict(self.reasons)}


def read_jsonl_rows(path: str | Path, report: SkipReport) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows, each row's 0-based line number) of a JSONL file (gzip by suffix). A blank line or a
    line that is not a JSON object is skipped and counted in `report`."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                report.skip(f"line {line_no + 1}", "blank line")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.skip(f"line {line_no + 1}", "not JSON", e.msg)
                continue
            if not isinstance(row, dict):
                report.skip(f"line {line_no + 1}", "not a JSON object", type(row).__name__)
                continue
            rows.append(row)
            lines.append(line_no)
    return rows, lines


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON-object rows of a file (malformed lines left out)."""
    return read_jsonl_rows(path, SkipReport())[0]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temp file + rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
