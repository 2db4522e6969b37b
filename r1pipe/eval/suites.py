"""Evaluation suites: the shipped registry (GSM8K, MATH-500, AIME 2024, AMC 2023, HumanEval, MBPP)
and loaders for the shipped copies and for a user's own JSONL file.

A suite is a list of `Problem`s, each with a stable `id` (the row's `id` / `task_id` field, else its
0-based line number, always as a string so `--responses` files may write 7 or "7"), the question
text, and the `reference` dict the grader needs: `{"answer": ...}` for math, the whole row for code.
Malformed rows are skipped and counted in `Suite.skipped`, never fatal.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

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


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold is the text after the last '####', thousands commas stripped."""
    if "####" not in solution:
        raise ValueError("no '####' in GSM8K answer")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


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
    "gsm8k": SuiteSpec("gsm8k/test.jsonl", "math", "question", None, lambda r: gsm8k_gold(r["answer"])),
    "math500": SuiteSpec("math500/test.jsonl", "math", "problem", "id", lambda r: str(r["answer"]).strip()),
    "aime24": SuiteSpec("aime24/test.jsonl", "math", "problem", "id", lambda r: integer_gold(r["answer"])),
    "amc23": SuiteSpec("amc23/test.jsonl", "math", "problem", "id", lambda r: integer_gold(r["answer"])),
    "humaneval": SuiteSpec("humaneval/HumanEval.jsonl.gz", "humaneval", "prompt", "task_id"),
    "mbpp": SuiteSpec("mbpp/sanitized-mbpp.jsonl", "mbpp", "prompt", "task_id"),
}
MATH_SUITES = tuple(name for name, spec in REGISTRY.items() if spec.kind == "math")
CODE_SUITES = tuple(name for name, spec in REGISTRY.items() if spec.kind in CODE_KINDS)


def data_path(relative: str) -> Path:
    """Path of a shipped suite file (package data; works for editable installs and wheels)."""
    return Path(str(resources.files("r1pipe.eval") / "suites_data" / relative))


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row or None, error) for each non-blank line; gzip by suffix."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, None, f"line {line_no}: bad JSON ({e.msg})"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"line {line_no}: not a JSON object"
                continue
            yield line_no, row, ""


def build_suite(
    name: str,
    path: Path,
    kind: str,
    question_field: str,
    id_field: str | None,
    gold: Callable[[dict], str] | None,
) -> Suite:
    if kind not in KINDS:
        raise ValueError(f"unknown suite kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"suite file not found: {path}")
    suite = Suite(name=name, kind=kind, problems=[], source=str(path))
    seen: set[str] = set()

    def skip(reason: str) -> None:
        suite.skipped += 1
        if len(suite.skipped_reasons) < 20:
            suite.skipped_reasons.append(reason)

    for line_no, row, error in read_jsonl(path):
        if row is None:
            skip(error)
            continue
        problem_id = str(row[id_field]) if id_field and id_field in row else str(line_no)
        question = row.get(question_field)
        if not isinstance(question, str) or not question.strip():
            skip(f"line {line_no}: no text in field {question_field!r}")
            continue
        if problem_id in seen:
            skip(f"line {line_no}: duplicate id {problem_id!r}")
            continue
        if kind == "math":
            try:
                reference = {"answer": gold(row) if gold else str(row["answer"]).strip()}
            except (KeyError, ValueError, TypeError) as e:
                skip(f"line {line_no}: no gold answer ({e!r})")
                continue
        else:
            missing = [f for f in REQUIRED_CODE_FIELDS[kind] if f not in row]
            if missing:
                skip(f"line {line_no}: missing {', '.join(missing)}")
                continue
            reference = dict(row)
        seen.add(problem_id)
        suite.problems.append(Problem(id=problem_id, question=question, reference=reference))
    return suite


def load_suite(name: str) -> Suite:
    """A shipped suite by registry name (see REGISTRY)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown suite {name!r}; shipped suites: {', '.join(REGISTRY)} (or use --suite-file)")
    spec = REGISTRY[name]
    return build_suite(name, data_path(spec.file), spec.kind, spec.question_field, spec.id_field, spec.gold)


def load_suite_file(
    path: str | Path,
    *,
    name: str | None = None,
    kind: str = "math",
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    id_field: str | None = "id",
) -> Suite:
    """A user's JSONL suite. Math rows need `prompt_field` and `answer_field`; code rows need the
    fields of their kind (humaneval: prompt/test/entry_point; mbpp: test_list; stdio: inputs/outputs).
    A GSM8K-style gold ('... #### 42') is reduced to what follows '####'."""
    path = Path(path)

    def gold(row: dict) -> str:
        value = row[answer_field]
        text = str(value).strip() if not isinstance(value, float) else integer_gold(value)
        return gsm8k_gold(text) if "####" in text else text

    return build_suite(name or path.stem, path, kind, prompt_field, id_field, gold if kind == "math" else None)


def resolve_suites(names: str | list[str]) -> list[Suite]:
    """'gsm8k,math500' or ['gsm8k', 'math'] -> suites; 'math' / 'code' / 'all' name groups."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    groups = {"math": MATH_SUITES, "code": CODE_SUITES, "all": tuple(REGISTRY)}
    expanded: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for item in groups.get(name, (name,)):
            if item not in expanded:
                expanded.append(item)
    return [load_suite(n) for n in expanded]
