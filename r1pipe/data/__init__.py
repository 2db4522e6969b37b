"""Data for r1pipe: one data layer for every stage's inputs (sources, field roles, typed rows),
prompt templates, synthetic reasoning problems, the tokenizer."""
from r1pipe.data.fields import FieldMap, pick_fields
from r1pipe.data.jsonl import SkipReport, read_jsonl, write_jsonl
from r1pipe.data.rows import PromptRow, SFTExample, load_prompt_rows, load_sft_examples, prompt_rows, sft_examples
from r1pipe.data.sources import DataError, Records, read_records
from r1pipe.data.templates import R1_MATH_SUFFIX, R1_ZERO_TEMPLATE, TEMPLATES, render_prompt, r1_math_prompt, r1_zero_prompt

__all__ = [
    "DataError", "FieldMap", "PromptRow", "Records", "SFTExample", "SkipReport",
    "load_prompt_rows", "load_sft_examples", "pick_fields", "prompt_rows", "read_jsonl", "read_records", "sft_examples", "write_jsonl",
    "R1_MATH_SUFFIX", "R1_ZERO_TEMPLATE", "TEMPLATES", "render_prompt", "r1_math_prompt", "r1_zero_prompt",
]
