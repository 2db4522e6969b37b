"""Code correctness: run a completion's program against tests in the sandbox.

Three test styles: HumanEval (`prompt` + completion + `test` + `check(entry_point)`), MBPP
(program, then `test_imports` and the `test_list` asserts) and stdin/stdout cases. A program
passes only if it exits 0 AND prints a per-run secret marker after the tests, so code that
calls `os._exit(0)` or `sys.exit()` before the tests run cannot pass. A program that does not even
compile fails without starting a sandbox.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import warnings
from dataclasses import dataclass

from .sandbox import SandboxConfig, SandboxResult, run_python

# a fenced block, closed or cut off at the end of the text (the token budget ran out inside it)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)


@dataclass
class CodeResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (no code / harness problem)
    stdout: str
    stderr: str
    timed_out: bool


def extract_code(completion: str) -> str:
    """The program a completion gives, the one code extractor of the project (the code reward, eval and
    rejection sampling all grade through it): the text after the chain of thought (the last `</think>`),
    the content of its `<answer>` block when it has one (dedented: the R1-Zero template puts the program
    there), then the last fenced block (```python ... ```), else that text itself."""
    text = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    if tagged := _ANSWER_BLOCK.search(text):
        text = textwrap.dedent(tagged.group(1).strip("\n"))
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _judge(res: SandboxResult, marker: str) -> CodeResult:
    marker_seen = marker in res.stdout[-4 * len(marker) - 64:]
    stdout = res.stdout.replace(marker, "").rstrip("\n")
    if res.timed_out:
        status = "timeout"
    elif res.returncode == 0 and marker_seen:
        status = "passed"
    else:
        status = "failed"
    return CodeResult(status == "passed", status, stdout, res.stderr, res.timed_out)


def syntax_error(program: str) -> str | None:
    """Why `program` does not compile, or None. Compiling only parses (nothing runs), and the sandbox
    runs this same interpreter, so a program that fails here would fail there: it is not run."""
    try:
        with warnings.catch_warnings():  # an invalid escape warns at compile time; the sandbox run reports it
            warnings.simplefilter("ignore")
            compile(program, "main.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _run_with_marker(program: str, timeout_s: float, memory_mb: int, config: SandboxConfig | None) -> CodeResult:
    error = syntax_error(program)
    if error is not None:
        return CodeResult(False, "failed", "", error, False)
    marker = f"R1PIPE-TESTS-PASSED-{secrets.token_hex(8)}"
    program += f"\n\nprint({marker!r}, flush=True)\n"
    return _judge(run_python(program, timeout_s, memory_mb, config=config), marker)


def humaneval_program(problem: dict, completion: str) -> str:
    """prompt + completion, or prompt + a full function when the completion redefines the entry point."""
    entry = problem["entry_point"]
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n    pass\n\n" + code  # keeps the prompt's imports and helpers
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def check_humaneval(problem: dict, completion: str, timeout_s: float = 10.0, memory_mb: int = 1024,
                    config: SandboxConfig | None = None) -> CodeResult:
    if not completion.strip():
        return CodeResult(False, "error", "", "empty completion", False)
    return _run_with_marker(humaneval_program(problem, completion), timeout_s, memory_mb, config)


def mbpp_program(problem: dict, code: str) -> str:
    imports = "\n".join(problem.get("test_imports") or [])
    tests = "\n".join(problem["test_list"])
    return f"{extract_code(code)}\n\n{imports}\n{tests}\n"


def check_mbpp(problem: dict, code: str, timeout_s: float = 10.0, memory_mb: int = 1024,
               config: SandboxConfig | None = None) -> CodeResult:
    if not code.strip():
        return CodeResult(False, "error", "", "empty completion", False)
    return _run_with_marker(mbpp_program(problem, code), timeout_s, memory_mb, config)


def _same_output(got: str, want: str) -> bool:
    lines = lambda s: [ln.rstrip() for ln in s.strip().splitlines()]  # noqa: E731
    return lines(got) == lines(want)


def check_stdio(code: str, inputs: list[str], outputs: list[str], timeout_s: float = 10.0,
                memory_mb: int = 1024, config: SandboxConfig | None = None) -> CodeResult:
    """Pass iff every case's stdout matches its expected output (line by line, trailing spaces ignored)."""
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    program = extract_code(code)
    if not program.strip() or not inputs:
        return CodeResult(False, "error", "", "empty completion or no cases", False)
    error = syntax_error(program)
    if error is not None:
        return CodeResult(False, "failed", "", error, False)
    for i, (stdin, want) in enumerate(zip(inputs, outputs)):
        res = run_python(program, timeout_s, memory_mb, stdin=stdin, config=config)
        if res.timed_out:
            return CodeResult(False, "timeout", res.stdout, res.stderr, True)
        if res.returncode != 0 or not _same_output(res.stdout, want):
            return CodeResult(False, "failed", res.stdout, f"case {i} failed\n{res.stderr}", False)
    return CodeResult(True, "passed", "", "", False)
