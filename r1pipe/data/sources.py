"""Where stage inputs come from: one reader for SFT data, GRPO prompts, rejection-sampling prompts
and eval suites.

A source is
- a file: JSON lines (`.jsonl`, `.jsonl.gz`), JSON (`.json`), Parquet (`.parquet`) or CSV (`.csv`);
- a directory written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`: the split is picked);
- a hub dataset name, `name` or `name:split` (e.g. `openai/gsm8k:test`), loaded through
  `datasets.load_dataset`. Nothing here reaches a hub unless the user's machine does; an unreachable
  hub is one `DataError` line.

JSON lines are read line by line so that one broken line is skipped and counted instead of failing
the whole file; every other format goes through `datasets`. The result is plain rows plus a
`SkipReport` that later validation steps keep adding to. A source without a single row (an empty
file, or one whose every line is blank or not a JSON object) is a DataError saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1pipe.data.jsonl import SkipReport, read_jsonl_rows
from r1pipe.errors import DataError

DATASETS_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


@dataclass
class Records:
    """Raw rows of a source, before any field is interpreted."""

    source: str
    rows: list[dict[str, Any]]
    indices: list[int]  # each row's 0-based line (JSON lines) or row number: its default id
    report: SkipReport
    unit: str = "row"  # "line" for JSON lines

    def place(self, i: int) -> str:
        """Where rows[i] is, for people: 'line 7' (1-based) or 'row 6' (0-based, as datasets counts)."""
        return f"line {self.indices[i] + 1}" if self.unit == "line" else f"row {self.indices[i]}"

    @property
    def columns(self) -> list[str]:
        """Field names in first-seen order over all rows."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)


def read_records(source: str | Path, split: str = "train") -> Records:
    """All rows of `source` (see the module docstring); `split` picks a DatasetDict's split or a
    hub dataset's split when the name carries none."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _nonempty(_from_dataset(text, _load_from_disk(path, split)))
    if path.is_file():
        suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffixes in (".jsonl", ".jsonl.gz"):
            return _nonempty(_read_jsonl(path))
        if path.suffix in DATASETS_FORMATS:
            if path.stat().st_size == 0:
                raise DataError(f"{text}: the file is empty")
            return _nonempty(_from_dataset(text, _load_file(path, DATASETS_FORMATS[path.suffix])))
        raise DataError(f"{text}: unknown data format {path.suffix!r} (expected .jsonl, .json, .parquet, .csv or a save_to_disk directory)")
    if path.suffix in (*DATASETS_FORMATS, ".jsonl", ".gz") or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{text}: no such file or directory")
    name, _, name_split = text.partition(":")
    return _nonempty(_from_dataset(text, _load_hub(name, name_split or split)))


def _nonempty(records: Records) -> Records:
    """The records, or a DataError when the source has no row at all."""
    if records.rows:
        return records
    if not records.report.skipped:
        raise DataError(f"{records.source}: no rows (the {'file' if Path(records.source).is_file() else 'dataset'} is empty)")
    raise DataError(f"{records.source}: no usable rows: {records.report.summary()}")


def _read_jsonl(path: Path) -> Records:
    report = SkipReport()
    rows, lines = read_jsonl_rows(path, report)
    return Records(str(path), rows, lines, report, unit="line")


def _from_dataset(source: str, dataset: Any) -> Records:
    rows = [dict(row) for row in dataset]
    return Records(source, rows, list(range(len(rows))), SkipReport())


def _load_file(path: Path, builder: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow / pandas parse errors: one line naming the file
        raise DataError(f"{path}: cannot read as {builder}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a directory written by Dataset.save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{name}: not a local file or directory, and the hub dataset could not be loaded "
                        f"(split {split!r}): {type(e).__name__}: {first}") from None
