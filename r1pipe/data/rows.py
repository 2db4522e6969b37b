"""Typed rows that stages consume, made once on the driver from raw records.

- `PromptRow`: a prompt for sampling (GRPO, rejection sampling): the rendered text, its token ids
  and the reference the rewards read.
- `SFTExample`: a tokenized training sequence and which tokens are trained (assistant text only).

Malformed rows (empty or non-string prompt, missing gold for a reward that needs one, longer than
the model's context, broken conversations) are skipped and counted in the records' SkipReport
before any worker starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from r1pipe.data.fields import CANDIDATES, FieldMap, pick_fields
from r1pipe.data.jsonl import SkipReport
from r1pipe.data.sources import Records, read_records
from r1pipe.data.templates import (
    check_messages, has_chat_template, r1_math_prompt, render_conversation, render_prompt, resolve_template,
)
from r1pipe.errors import DataError

ReferenceCheck = Callable[[dict], "str | None"]  # why a reference cannot be scored, or None


@dataclass
class PromptRow:
    id: str
    question: str  # the source's prompt text
    prompt: str  # rendered with the template: what the model sees
    prompt_ids: list[int]
    reference: dict[str, Any]  # the whole source row, `answer` set to the gold text when there is one


@dataclass
class SFTExample:
    id: str
    input_ids: list[int]
    target_mask: list[bool]  # token i is a training target (predicted from tokens < i)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.target_mask)


def row_id(records: Records, i: int, fields: FieldMap) -> str:
    """The row's id field as text, else its 0-based line / row number."""
    value = records.rows[i].get(fields.id) if fields.id else None
    return str(value) if value is not None else str(records.indices[i])


def _text(value: Any) -> str | None:
    """A usable string field, or None (absent, not a string, or blank)."""
    return value if isinstance(value, str) and value.strip() else None


def _kind(value: Any) -> str:
    return "missing" if value is None else ("empty" if isinstance(value, str) else f"a {type(value).__name__}")


def gold_text(value: Any) -> str | None:
    """A gold answer as text: numbers become strings ('27.0' stays as written), blanks are None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return _text(value)


def prompt_rows(records: Records, fields: FieldMap, tokenizer: Any, *, template: str = "auto",
                instruction: str | None = None, max_prompt_tokens: int | None = None,
                check_reference: ReferenceCheck | None = None) -> list[PromptRow]:
    """Prompt rows to sample from; bad rows are skipped and counted in records.report.

    max_prompt_tokens: the longest rendered prompt that still leaves room for the completion
    (the engine's max_model_len minus max_tokens). check_reference: the rewards' verdict on
    whether a row carries what they need (a gold answer, tests).
    """
    if fields.prompt is None:
        raise DataError(f"{records.source}: no prompt field (looked for {', '.join(CANDIDATES['prompt'])}); "
                         f"its fields: {', '.join(records.columns) or '(none)'}")
    report = records.report
    kwargs = {"instruction": instruction} if instruction else {}
    # a chat template writes the special tokens (BOS) into the text; plain text gets the tokenizer's own
    chat_rendered = resolve_template(template, tokenizer) in ("r1", "chat") and has_chat_template(tokenizer)
    out: list[PromptRow] = []
    seen: set[str] = set()
    for i, row in enumerate(records.rows):
        place = records.place(i)
        question = _text(row.get(fields.prompt))
        if question is None:
            report.skip(place, f"{_kind(row.get(fields.prompt))} prompt")
            continue
        reference = dict(row)
        if fields.answer is not None:
            gold = gold_text(row.get(fields.answer))
            reference.pop(fields.answer, None)
            if gold is not None:
                reference["answer"] = gold
        if check_reference is not None:
            why = check_reference(reference)
            if why:
                report.skip(place, why)
                continue
        id_ = row_id(records, i, fields)
        if id_ in seen:
            report.skip(place, "duplicate id", id_)
            continue
        prompt = render_prompt(question, template, tokenizer, **kwargs)
        ids = tokenizer(prompt, add_special_tokens=not chat_rendered).input_ids
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            report.skip(place, "prompt too long", f"{len(ids)} tokens > {max_prompt_tokens}")
            continue
        seen.add(id_)
        out.append(PromptRow(id_, question, prompt, ids, reference))
    report.kept = len(out)
    return out


def conversation_of(row: dict, fields: FieldMap, template: str, tokenizer: Any) -> tuple[list[tuple[str, bool]] | None, str]:
    """(segments, "") for a trainable row, or (None, why not)."""
    if fields.messages is not None and row.get(fields.messages) is not None:
        messages = row[fields.messages]
        why = check_messages(messages)
        return (None, why) if why else (render_conversation(messages, tokenizer), "")
    if fields.prompt is None or fields.response is None:
        return None, "neither messages nor prompt + response"
    prompt, response = _text(row.get(fields.prompt)), _text(row.get(fields.response))
    if prompt is None:
        return None, f"{_kind(row.get(fields.prompt))} prompt"
    if response is None:
        return None, f"{_kind(row.get(fields.response))} response"
    resolved = resolve_template(template, tokenizer)
    if resolved in ("r1", "chat") and has_chat_template(tokenizer):
        user = prompt if resolved == "chat" else r1_math_prompt(prompt)
        return render_conversation([{"role": "user", "content": user}, {"role": "assistant", "content": response}], tokenizer), ""
    text = render_prompt(prompt, resolved, tokenizer)
    lead = "" if response[:1].isspace() or text[-1:].isspace() else " "
    return [(text, False), (lead + response + (getattr(tokenizer, "eos_token", None) or ""), True)], ""


def tokenize_segments(segments: Sequence[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Each segment encoded on its own (as generation sees a prompt, then continues it). Without a
    chat template (which writes BOS into the text) the first segment gets the tokenizer's special
    tokens, as a prompt does in prompt_rows."""
    ids: list[int] = []
    mask: list[bool] = []
    texts = [text for text, _ in segments]
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    if not has_chat_template(tokenizer):
        encoded[0] = tokenizer(texts[0], add_special_tokens=True).input_ids
    for (_, trained), seg in zip(segments, encoded):
        ids += seg
        mask += [trained] * len(seg)
    return ids, mask


def sft_examples(records: Records, fields: FieldMap, tokenizer: Any, *, template: str = "auto",
                 max_length: int, truncate: bool = False) -> list[SFTExample]:
    """Tokenized SFT sequences; rows without trainable text, or longer than max_length tokens, are skipped
    and counted by reason in records.report (with `truncate`, a long row is cut to max_length instead and
    counted as truncated; it is skipped only if no trainable token is left)."""
    report = records.report
    out: list[SFTExample] = []
    for i, row in enumerate(records.rows):
        place = records.place(i)
        segments, why = conversation_of(row, fields, template, tokenizer)
        if segments is None:
            report.skip(place, why)
            continue
        ids, mask = tokenize_segments(segments, tokenizer)
        cut = False
        if len(ids) > max_length:
            if not truncate:
                report.skip(place, "longer than max_length", f"{len(ids)} tokens > {max_length}")
                continue
            ids, mask, cut = ids[:max_length], mask[:max_length], True
        if not any(mask[1:]):
            report.skip(place, "no trainable tokens" + (" within max_length" if cut else ""))
            continue
        report.truncated += cut
        out.append(SFTExample(row_id(records, i, fields), ids, mask))
    report.kept = len(out)
    return out


def load_prompt_rows(source: str, tokenizer: Any, *, split: str = "train", fields: dict[str, str | None] | None = None,
                     template: str = "auto", instruction: str | None = None, max_prompt_tokens: int | None = None,
                     check_reference: ReferenceCheck | None = None, option_prefix: str = "",
                     log: Callable[[str], None] = print) -> tuple[list[PromptRow], SkipReport]:
    """read_records -> pick_fields (prompt, answer, id) -> prompt_rows, saying what was picked and skipped."""
    records = read_records(source, split)
    picked = pick_fields(records.columns, ("prompt", "answer", "id"), fields, source, option_prefix)
    log(f"data: {source}: {len(records.rows) + records.report.skipped} rows; fields {picked.describe()}")
    rows = prompt_rows(records, picked, tokenizer, template=template, instruction=instruction,
                       max_prompt_tokens=max_prompt_tokens, check_reference=check_reference)
    log(f"data: {source}: {records.report.summary()}")
    return rows, records.report


def load_sft_examples(source: str, tokenizer: Any, *, split: str = "train", fields: dict[str, str | None] | None = None,
                      template: str = "auto", max_length: int, truncate: bool = False, option_prefix: str = "",
                      log: Callable[[str], None] = print) -> tuple[list[SFTExample], SkipReport]:
    """read_records -> pick_fields (messages, or prompt + response; id) -> sft_examples, logged."""
    records = read_records(source, split)
    picked = pick_fields(records.columns, ("messages", "prompt", "response", "id"), fields, source, option_prefix)
    log(f"data: {source}: {len(records.rows) + records.report.skipped} rows; fields {picked.describe()}")
    examples = sft_examples(records, picked, tokenizer, template=template, max_length=max_length, truncate=truncate)
    log(f"data: {source}: {records.report.summary()}")
    return examples, records.report
