"""Prompt templates: the one place every stage (pretrain, SFT, GRPO, rejection sampling) and eval
turn a question or a conversation into model input text.

- `r1-zero`: DeepSeek-R1-Zero's training template (R1 paper, Table 1): a base model is asked for
  `<think> ... </think> <answer> ... </answer>`; the prompt ends at "Assistant:" so the completion
  starts with " <think>". Idempotent: a question that already is an R1-Zero prompt is kept.
- `r1`: the question followed by the R1 instruction ("Please reason step by step, and put your
  final answer within \\boxed{}." for math), through the tokenizer's chat template when it has one.
- `chat`: the question alone through the tokenizer's chat template (it must have one).
- `raw`: the text unchanged (prompts that are formatted already).
- `auto`: `r1` when the tokenizer has a chat template, else `r1-zero`.

Conversations (`messages` with roles) use the tokenizer's chat template when it has one, else the
R1 conversation format below: the R1-Zero preamble, then " User: ... Assistant: ..." turns, each
assistant turn closed by the end-of-sequence token.
"""
from __future__ import annotations

from typing import Any, Sequence

from r1pipe.errors import ConfigError, ModelError

TEMPLATES = ("auto", "r1-zero", "r1", "chat", "raw")

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {problem} Assistant:"
)
R1_ZERO_HEAD = R1_ZERO_TEMPLATE.split(" User: {problem}", 1)[0]

R1_MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
ROLES = ("system", "user", "assistant")


def r1_zero_prompt(problem: str) -> str:
    """The R1-Zero prompt for one problem; the model continues with " <think> ..."."""
    return R1_ZERO_TEMPLATE.format(problem=problem.strip())


def is_r1_zero_prompt(text: str) -> bool:
    return text.startswith(R1_ZERO_HEAD) and text.rstrip().endswith("Assistant:")


def r1_math_prompt(problem: str) -> str:
    """The problem followed by the R1 math instruction (answer in \\boxed{})."""
    return f"{problem.strip()}\n{R1_MATH_SUFFIX}"


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer: Any) -> str:
    """A template name with `auto` decided for this tokenizer; an unknown name is a ValueError."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template != "auto":
        return template
    return "r1" if has_chat_template(tokenizer) else "r1-zero"


def render_prompt(question: str, template: str, tokenizer: Any = None, instruction: str = R1_MATH_SUFFIX) -> str:
    """The model input for one question under `template` (see the module docstring)."""
    template = resolve_template(template, tokenizer)
    if template == "raw":
        return question
    if template == "r1-zero":
        return question if is_r1_zero_prompt(question) else r1_zero_prompt(question)
    user = f"{question.strip()}\n{instruction}" if template == "r1" else question
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    if template == "chat":
        raise ConfigError("template 'chat' needs a tokenizer with a chat template (use r1-zero, r1 or raw)")
    return user + "\n"


def stop_strings(template: str, tokenizer: Any = None) -> tuple[str, ...]:
    """Where generation stops besides end-of-sequence: R1-Zero answers end at `</answer>`."""
    return ("</answer>",) if resolve_template(template, tokenizer) == "r1-zero" else ()


def check_messages(messages: Any) -> str | None:
    """Why `messages` is not a trainable conversation, or None when it is."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "messages is not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{i}] is not {{'role': system|user|assistant, 'content': str}}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant turn with text"
    return None


def render_conversation(messages: Sequence[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    """A conversation as text segments (text, is_assistant) that concatenate to the full rendering.

    With a chat template, segment i is what rendering messages[: i + 1] adds to messages[: i]
    (the generation prompt of an assistant turn belongs to the segment before it, so only the
    assistant's own words and end-of-turn tokens are trained). Without one, the R1 format.
    """
    if has_chat_template(tokenizer):
        return _chat_segments(messages, tokenizer)
    eos = getattr(tokenizer, "eos_token", None) or ""
    segments: list[tuple[str, bool]] = []
    system = " ".join(m["content"].strip() for m in messages if m["role"] == "system")
    head = R1_ZERO_HEAD + (f" {system}" if system else "")
    for m in messages:
        if m["role"] == "user":
            segments.append((f"{head} User: {m['content'].strip()} Assistant:", False))
            head = ""
        elif m["role"] == "assistant":
            segments.append((f" {m['content'].strip()}{eos}", True))
    return segments


def _chat_segments(messages: Sequence[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ModelError("the tokenizer's chat template does not render conversations prefix by prefix")
            segments.append((prompt[len(done):], False))
            done = prompt
        text = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not text.startswith(done):
            raise ModelError("the tokenizer's chat template does not render conversations prefix by prefix")
        segments.append((text[len(done):], m["role"] == "assistant"))
        done = text
    return [(t, a) for t, a in segments if t]
