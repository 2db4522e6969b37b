"""Data for r1pipe: prompt templates, JSONL problem files, synthetic reasoning problems, the tokenizer."""
from r1pipe.data.jsonl import JsonlStats, read_jsonl, read_problems, write_jsonl
from r1pipe.data.templates import R1_MATH_SUFFIX, R1_ZERO_TEMPLATE, TEMPLATES, apply_template, r1_math_prompt, r1_zero_prompt

__all__ = [
    "JsonlStats", "read_jsonl", "read_problems", "write_jsonl",
    "R1_MATH_SUFFIX", "R1_ZERO_TEMPLATE", "TEMPLATES", "apply_template", "r1_math_prompt", "r1_zero_prompt",
]
