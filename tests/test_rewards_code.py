"""Code reward against real suites: every HumanEval canonical solution and MBPP reference passes,
and a corrupted variant of each HumanEval solution fails. Runs in parallel over sandboxes."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from r1pipe.rewards.code import check_humaneval, check_mbpp, check_stdio, extract_code

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl.gz"
MBPP = DATA / "mbpp" / "sanitized-mbpp.jsonl"
THREADS = 4  # sandboxes mostly wait on their child process

pytestmark = pytest.mark.skipif(not HUMANEVAL.exists(), reason="shared data suites not present")

# Wrap the entry point so every result is changed: a solution that returns the right answer no more.
CORRUPT = """

def _r1pipe_corrupt(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "#"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    return ("corrupted", value)

_r1pipe_original = {entry}

def {entry}(*args, **kwargs):
    return _r1pipe_corrupt(_r1pipe_original(*args, **kwargs))
"""


def _load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def humaneval() -> list[dict]:
    return _load(HUMANEVAL)


def test_humaneval_canonical_solutions_all_pass(humaneval):
    assert len(humaneval) == 164
    with ThreadPoolExecutor(THREADS) as ex:
        results = list(ex.map(lambda p: check_humaneval(p, p["canonical_solution"], timeout_s=30), humaneval))
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(humaneval, results) if not r.passed]
    assert failed == []


def test_humaneval_corrupted_solutions_all_fail(humaneval):
    def corrupted(p):
        return check_humaneval(p, p["canonical_solution"] + CORRUPT.format(entry=p["entry_point"]))

    with ThreadPoolExecutor(THREADS) as ex:
        results = list(ex.map(corrupted, humaneval))
    passed = [p["task_id"] for p, r in zip(humaneval, results) if r.passed]
    assert passed == []
    assert all(r.status == "failed" for r in results)


def test_mbpp_reference_code_passes():
    problems = _load(MBPP)
    assert len(problems) == 427
    with ThreadPoolExecutor(THREADS) as ex:
        results = list(ex.map(lambda p: check_mbpp(p, p["code"], timeout_s=30), problems))
    failed = [(p["task_id"], r.stderr[-200:]) for p, r in zip(problems, results) if not r.passed]
    assert failed == []


def test_mbpp_wrong_code_fails():
    problem = _load(MBPP)[0]
    wrong = problem["code"].replace("return", "return None and", 1)
    assert not check_mbpp(problem, wrong).passed


def test_full_function_completion_in_markdown(humaneval):
    p = humaneval[0]
    completion = "Here it is:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\nDone."
    assert check_humaneval(p, completion).passed


def test_early_exit_cannot_pass(humaneval):
    p = humaneval[0]
    for cheat in ("    return True\nimport sys\nsys.exit(0)\n", "    return True\nimport os\nos._exit(0)\n"):
        r = check_humaneval(p, cheat)
        assert not r.passed and r.status == "failed"


def test_stdio_cases():
    code = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert check_stdio(code, ["1 2\n", "10 -3\n"], ["3\n", "7"]).passed
    r = check_stdio(code, ["1 2\n", "2 2\n"], ["3", "5"])
    assert not r.passed and r.status == "failed"
    assert check_stdio("while True: pass", ["\n"], [""], timeout_s=1).status == "timeout"


def test_extract_code_takes_last_block():
    assert extract_code("```python\nx = 1\n```\ntext\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("plain = 3") == "plain = 3"


def test_a_program_that_does_not_compile_fails_without_a_sandbox(monkeypatch):
    import r1pipe.rewards.code as code

    def no_sandbox(*args, **kwargs):
        raise AssertionError("the sandbox was started")

    monkeypatch.setattr(code, "run_python", no_sandbox)
    for result in (check_mbpp({"test_list": ["assert f(1) == 2"]}, "def f(x) return x + 1"),
                   check_stdio("print((1)", ["\n"], ["1"])):
        assert not result.passed and result.status == "failed" and result.stderr.startswith("SyntaxError")
    assert code.syntax_error("def f(x): return x + 1") is None
    assert code.syntax_error("(" * 1000 + ")" * 1000) is not None  # too deeply nested: refused by the parser
