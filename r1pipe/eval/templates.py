"""Prompt templates per suite kind and model kind.

- `r1-zero`: DeepSeek-R1-Zero's training template (R1 paper, Table 1): a base model is asked for
  `<think>...</think> <answer>...</answer>`; generation stops after `</answer>`.
- `r1`: the R1 protocol's instruction ("Please reason step by step, and put your final answer
  within \\boxed{}." for math), rendered with the tokenizer's chat template when it has one.
- `raw`: the question text unchanged (for suites whose prompts are already formatted).
- `auto`: `r1` through the chat template when the tokenizer has one, else `r1-zero`.

A question that already is an R1-Zero prompt (the synthetic suites' `prompt` field) is used as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1pipe.data.templates import R1_MATH_SUFFIX, R1_ZERO_TEMPLATE, r1_zero_prompt
from r1pipe.eval.suites import Problem, Suite

TEMPLATES = ("auto", "r1-zero", "r1", "raw")

# The training template and instruction live with the data (r1pipe.data.templates), so eval
# prompts a model exactly as RL trained it.
MATH_INSTRUCTION = R1_MATH_SUFFIX
CODE_INSTRUCTION = (
    "Please reason step by step, then write the complete solution as one Python code block "
    "(```python ... ```)."
)
STDIO_INSTRUCTION = "The program reads standard input and writes standard output."


@dataclass(frozen=True)
class Prompt:
    text: str
    stop: tuple[str, ...] = ()


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer: Any) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template != "auto":
        return template
    return "r1" if has_chat_template(tokenizer) else "r1-zero"


def is_r1_zero_prompt(text: str) -> bool:
    head = R1_ZERO_TEMPLATE.split("{", 1)[0]
    return text.startswith(head) and text.rstrip().endswith("Assistant:")


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
    """The model's prompt for one problem under a resolved template (not 'auto')."""
    question = question_text(suite, problem)
    if template == "raw":
        return Prompt(problem.question)
    if template == "r1-zero":
        if is_r1_zero_prompt(problem.question):  # e.g. the synthetic suites' `prompt`, templated already
            return Prompt(problem.question, stop=("</answer>",))
        return Prompt(r1_zero_prompt(question), stop=("</answer>",))
    instruction = MATH_INSTRUCTION if suite.kind == "math" else CODE_INSTRUCTION
    user = f"{question}\n{instruction}"
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return Prompt(text)
    return Prompt(user + "\n")
