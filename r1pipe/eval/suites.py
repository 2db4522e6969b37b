"""Evaluation suites: the shipped registry (GSM8K, MATH-500, AIME 2024, AMC 2023, HumanEval, MBPP)
and loaders for the shipped copies and for a user's own suite (any r1pipe.data source).

A suite is a list of `Problem`s, each with a stable `id` (the row's `id` / `task_id` field, else its
0-based line number, always as a string so `--responses` files may write 7 or "7"), the question
text, and the `reference` dict the grader needs: `{"answer": ...}` for math, the whole row for code.
Malformed rows are skipped and counted in `Suite.skipped`, never fatal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from r1pipe.data.fields import CANDIDATES, FieldMap, pick_fields
from r1pipe.data.rows import gold_text, row_id
from r1pipe.data.sources import Records, read_records
from r1pipe.errors import DataError
from r1pipe.rewards import extract_gsm8k_gold, gold_answer

# How a suite is graded; "stdio" are programs read from stdin, judged on stdout (`inputs`/`outputs`).
KINDS = ("math", "humaneval", "mbpp", "stdio")
CODE_KINDS = ("humaneval", "mbpp", "stdio")
# Fields a code row must carry for its grader (the whole row becomes the reference).
REQUIRED_CODE_FIELDS = {
    "humaneval": ("prompt", "test", "entry_point"),
    "mbpp": ("test_list",),
    "stdio": ("inputs", "outputs"),
}


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    reference: dict[str, Any]


@dataclass
class Suite:
    name: str
    kind: str
    problems: list[Problem]
    source: str = ""
    skipped: int = 0  # malformed rows left out
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def is_code(self) -> bool:
        return self.kind in CODE_KINDS


def integer_gold(value: Any) -> str:
    """AIME/AMC golds: '025' -> '25', 27.0 -> '27'; non-integral numbers keep their text."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return str(int(text)) if text.lstrip("-").isdigit() else text


@dataclass(frozen=True)
class SuiteSpec:
    """Where a shipped suite lives and how to read its rows."""

    file: str  # relative to suites_data/
    kind: str
    question_field: str | None  # None for code suites whose prompt is the row's `prompt`
    id_field: str | None
    gold: Callable[[dict], str] | None = None  # math only


REGISTRY: dict[str, SuiteSpec] = {
    "gsm8k": SuiteSpec("gsm8k/test.jsonl", "math", "question", None, lambda r: extract_gsm8k_gold(r["answer"])),
    "math500": SuiteSpec("math500/test.jsonl", "math", "problem", "id", lambda r: str(r["answer"]).strip()),
    "aime24": SuiteSpec("aime24/test.jsonl", "math", "problem", "id", lambda r: integer_gold(r["answer"])),
    "amc23": SuiteSpec("amc23/test.jsonl", "math", "problem", "id", lambda r: integer_gold(r["answer"])),
    "humaneval": SuiteSpec("humaneval/HumanEval.jsonl.gz", "humaneval", "prompt", "task_id"),
    "mbpp": SuiteSpec("mbpp/sanitized-mbpp.jsonl", "mbpp", "prompt", "task_id"),
}
MATH_SUITES = tuple(name for name, spec in REGISTRY.items() if spec.kind == "math")
CODE_SUITES = tuple(name for name, spec in REGISTRY.items() if spec.kind in CODE_KINDS)
GROUPS = {"math": MATH_SUITES, "code": CODE_SUITES, "all": tuple(REGISTRY)}


def data_path(relative: str) -> Path:
    """Path of a shipped suite file (package data; works for editable installs and wheels)."""
    return Path(str(resources.files("r1pipe.eval") / "suites_data" / relative))


def build_suite(name: str, records: Records, kind: str, fields: FieldMap, gold: Callable[[dict], str] | None) -> Suite:
    """A suite from a source's rows; malformed rows are skipped and counted (never fatal)."""
    if kind not in KINDS:
        raise ValueError(f"unknown suite kind {kind!r}; expected one of {', '.join(KINDS)}")
    if fields.prompt is None:
        raise DataError(f"{records.source}: no question field (looked for {', '.join(CANDIDATES['prompt'])}); "
                         f"its fields: {', '.join(records.columns) or '(none)'}")
    report = records.report
    suite = Suite(name=name, kind=kind, problems=[], source=records.source)
    seen: set[str] = set()
    for i, row in enumerate(records.rows):
        place = records.place(i)
        problem_id = row_id(records, i, fields)
        question = row.get(fields.prompt)
        if not isinstance(question, str) or not question.strip():
            report.skip(place, f"no text in field {fields.prompt!r}")
            continue
        if problem_id in seen:
            report.skip(place, "duplicate id", problem_id)
            continue
        if kind == "math":
            try:
                answer = gold(row) if gold else gold_text(row.get(fields.answer or "answer"))
            except (KeyError, ValueError, TypeError) as e:
                answer, _ = None, e
            if answer is None:
                report.skip(place, "no gold answer")
                continue
            reference = {"answer": answer}
        else:
            missing = [f for f in REQUIRED_CODE_FIELDS[kind] if f not in row]
            if missing:
                report.skip(place, "missing " + ", ".join(missing))
                continue
            reference = dict(row)
        seen.add(problem_id)
        suite.problems.append(Problem(id=problem_id, question=question, reference=reference))
    report.kept = len(suite.problems)
    suite.skipped = report.skipped
    suite.skipped_reasons = [f"{n} {reason} ({'; '.join(report.examples[reason])})" for reason, n in report.reasons.most_common()]
    return suite


def load_suite(name: str) -> Suite:
    """A shipped suite by registry name (see REGISTRY)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown suite {name!r}; shipped suites: {', '.join(REGISTRY)} (or use --suite-file)")
    spec = REGISTRY[name]
    path = data_path(spec.file)
    if not path.is_file():
        raise FileNotFoundError(f"suite file not found: {path}")
    fields = FieldMap(prompt=spec.question_field, id=spec.id_field)
    return build_suite(name, read_records(path), spec.kind, fields, spec.gold)


def load_suite_file(
    path: str | Path,
    *,
    name: str | None = None,
    kind: str = "math",
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str = "train",
    log: Callable[[str], None] | None = None,
) -> Suite:
    """A user's suite from any data-layer source (JSONL/Parquet/CSV file, save_to_disk directory,
    hub name). Field names not given are auto-detected (question: prompt / problem / question / ...;
    gold: answer / final_answer / solution / ...; id: id / task_id / ...) and `log` is told the pick.
    Math rows need a question and a gold; code rows need the fields of their kind (humaneval:
    prompt/test/entry_point; mbpp: test_list; stdio: inputs/outputs). A GSM8K-style gold
    ('... #### 42') is reduced to what follows '####'."""
    if kind not in KINDS:
        raise ValueError(f"unknown suite kind {kind!r}; expected one of {', '.join(KINDS)}")
    records = read_records(path, split)
    roles = ("prompt", "answer", "id") if kind == "math" else ("prompt", "id")
    explicit = {"prompt": prompt_field, "answer": answer_field, "id": id_field}
    fields = pick_fields(records.columns, roles, explicit, str(path), option_prefix="--")
    if log is not None:
        log(f"{path}: fields {fields.describe()}")

    def gold(row: dict) -> str | None:
        text = gold_text(row.get(fields.answer)) if fields.answer else None
        return gold_answer(text) if text is not None else None

    stem = Path(str(path)).name.split(".")[0] or str(path)
    return build_suite(name or stem, records, kind, fields, gold if kind == "math" else None)


def resolve_suites(names: str | list[str]) -> list[Suite]:
    """'gsm8k,math500' or ['gsm8k', 'math'] -> suites; 'math' / 'code' / 'all' name groups."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    expanded: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for item in GROUPS.get(name, (name,)):
            if item not in expanded:
                expanded.append(item)
    return [load_suite(n) for n in expanded]
