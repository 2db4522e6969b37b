"""JSON-lines files: tolerant reading (malformed rows are skipped and counted) and atomic writing."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclass
class JsonlStats:
    """What a read kept and what it skipped, with the first few reasons (line number: why)."""

    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, line_no: int, why: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 10:
            self.reasons.append(f"line {line_no}: {why}")


def read_jsonl(path: str | Path, required: Sequence[str] = (), stats: JsonlStats | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file. Blank lines are ignored; rows that are not JSON objects or lack a
    `required` field are skipped and counted in `stats` instead of stopping the read."""
    stats = stats if stats is not None else JsonlStats()
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip(line_no, f"not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                stats.skip(line_no, f"not an object ({type(row).__name__})")
                continue
            missing = [k for k in required if row.get(k) is None]
            if missing:
                stats.skip(line_no, f"missing {', '.join(missing)}")
                continue
            rows.append(row)
    stats.rows += len(rows)
    return rows


def read_problems(path: str | Path, stats: JsonlStats | None = None) -> list[dict[str, Any]]:
    """Problem rows {"id", "prompt", "answer", ...}; answers are normalised to strings and a row
    without an id gets its line's position as id."""
    rows = read_jsonl(path, required=("prompt", "answer"), stats=stats)
    for i, row in enumerate(rows):
        row["answer"] = str(row["answer"])
        row.setdefault("id", str(i))
    return rows


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
