"""Prompt templates of the R1 paper.

R1-Zero's template asks the base model to think inside `<think> </think>` and answer inside
`<answer> </answer>`; the prompt ends at "Assistant:" so the completion starts with " <think>".
The R1 math prompt is the instruction the paper recommends for evaluating math suites.
"""
from __future__ import annotations

from typing import Callable

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {problem} Assistant:"
)

R1_MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def r1_zero_prompt(problem: str) -> str:
    """The R1-Zero prompt for one problem; the model continues with " <think> ..."."""
    return R1_ZERO_TEMPLATE.format(problem=problem.strip())


def r1_math_prompt(problem: str) -> str:
    """The problem followed by the R1 math instruction (answer in \\boxed{})."""
    return f"{problem.strip()}\n{R1_MATH_SUFFIX}"


def raw_prompt(problem: str) -> str:
    return problem


TEMPLATES: dict[str, Callable[[str], str]] = {"r1_zero": r1_zero_prompt, "r1_math": r1_math_prompt, "none": raw_prompt}


def apply_template(name: str, problem: str) -> str:
    """Render `problem` with the template called `name` (one of TEMPLATES)."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name](problem)
