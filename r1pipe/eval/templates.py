"""Eval prompts: each suite's question as a user would read it (with what its grader expects of
the answer), rendered by the one template module, r1pipe.data.templates (`auto`, `r1-zero`, `r1`,
`chat`, `raw`), so eval prompts a model exactly as training did.

A question that already is an R1-Zero prompt (the synthetic suites' `prompt` field) is used as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1pipe.data.templates import R1_MATH_SUFFIX, TEMPLATES, render_prompt, resolve_template, stop_strings
from r1pipe.eval.suites import Problem, Suite

__all__ = ["TEMPLATES", "Prompt", "question_text", "render", "resolve_template"]

CODE_INSTRUCTION = (
    "Please reason step by step, then write the complete solution as one Python code block "
    "(```python ... ```)."
)
STDIO_INSTRUCTION = "The program reads standard input and writes standard output."


@dataclass(frozen=True)
class Prompt:
    text: str
    stop: tuple[str, ...] = ()


def question_text(suite: Suite, problem: Problem) -> str:
    """The task as a user would read it, with what the suite's grader expects of the answer."""
    ref = problem.reference
    if suite.kind == "math":
        return problem.question.strip()
    if suite.kind == "humaneval":
        return (
            "Complete the following Python function. Write the whole function (signature included).\n"
            f"```python\n{ref['prompt'].rstrip()}\n```"
        )
    if suite.kind == "mbpp":
        tests = "\n".join(ref.get("test_list", [])[:1])
        return f"{problem.question.strip()}\nYour code should pass this test:\n```python\n{tests}\n```"
    return f"{problem.question.strip()}\n{STDIO_INSTRUCTION}"


def render(suite: Suite, problem: Problem, template: str, tokenizer: Any = None) -> Prompt:
    """The model's prompt for one problem under a template."""
    if resolve_template(template, tokenizer) == "raw":
        return Prompt(problem.question)
    instruction = R1_MATH_SUFFIX if suite.kind == "math" else CODE_INSTRUCTION
    text = render_prompt(question_text(suite, problem), template, tokenizer, instruction=instruction)
    return Prompt(text, stop=stop_strings(template, tokenizer))
