"""The data layer: sources (JSONL / Parquet / CSV / save_to_disk / hub), field detection, typed rows
with bad rows skipped and counted, conversations rendered with assistant-only targets."""
from __future__ import annotations

import json

import datasets
import pytest

from r1pipe.data import DataError, load_prompt_rows, pick_fields, prompt_rows, read_records, sft_examples
from r1pipe.data.rows import tokenize_segments
from r1pipe.data.templates import R1_ZERO_HEAD, render_conversation
from r1pipe.data.tokenizer import save_tokenizer, train_tokenizer
from r1pipe.rewards import missing_reference

ROWS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": i} for i in range(5)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    texts = [f"User: What is {i} + {j}? Assistant: <think> {i}+{j}={i + j} </think> <answer> {i + j} </answer>"
             for i in range(30) for j in range(30)]
    save_tokenizer(train_tokenizer(texts, vocab_size=300), path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture
def sources(tmp_path):
    """The same rows as JSONL, Parquet, CSV and a save_to_disk directory."""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    return tmp_path


@pytest.mark.parametrize("name", ["p.jsonl", "p.parquet", "p.csv", "disk"])
def test_every_source_format_reads_the_same_rows(sources, name):
    records = read_records(sources / name)
    assert [r["problem"] for r in records.rows] == [r["problem"] for r in ROWS]
    assert [str(r["answer"]) for r in records.rows] == [r["answer"] for r in ROWS]  # CSV parses numbers
    assert records.indices == list(range(5)) and records.report.skipped == 0


def test_dataset_dict_split_and_errors(sources, tmp_path):
    assert len(read_records(sources / "dict", split="test").rows) == 2
    with pytest.raises(DataError, match="no split 'dev'; splits: train, test"):
        read_records(sources / "dict", split="dev")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(tmp_path / "absent.parquet")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_records(tmp_path / "x.txt")


def test_unreachable_hub_is_one_clear_line(monkeypatch):
    import huggingface_hub.constants

    # offline, as on a machine without the hub (set on the modules: they read the environment at import)
    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DataError) as info:
        read_records("someone/no-such-dataset-r1pipe:test")
    message = str(info.value)
    assert "\n" not in message and message.startswith("someone/no-such-dataset-r1pipe: not a local file")
    assert "split 'test'" in message


def test_field_detection_and_explicit_names():
    fields = pick_fields(["question", "final_answer", "id"], ("prompt", "answer", "id"))
    assert (fields.prompt, fields.answer, fields.id) == ("question", "final_answer", "id")
    assert fields.detected == ("prompt", "answer", "id") and "prompt='question' (auto)" in fields.describe()
    # response and answer never pick the same column; explicit names win and are checked
    sft = pick_fields(["problem", "solution", "answer"], ("prompt", "response"))
    assert (sft.prompt, sft.response) == ("problem", "solution")
    explicit = pick_fields(["q", "a"], ("prompt", "answer"), {"prompt": "q", "answer": "a"})
    assert explicit.detected == () and explicit.prompt == "q"
    with pytest.raises(DataError, match=r"rl\.prompt_field='query': data has no such field; its fields: q, a"):
        pick_fields(["q", "a"], ("prompt",), {"prompt": "query"}, option_prefix="rl.")


def test_bad_prompt_rows_are_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}),
        json.dumps({"prompt": "", "answer": "1"}),
        json.dumps({"prompt": ["What", "is"], "answer": "1"}),
        json.dumps({"prompt": "What is 1 + 1? " * 400, "answer": "2"}),
        '{"prompt": "broken',
        json.dumps({"prompt": "What is 2 + 2?"}),
        json.dumps({"prompt": "What is 3 + 3?", "answer": 6}),
    ]
    path.write_text("\n".join(lines) + "\n")
    rows, report = load_prompt_rows(str(path), tokenizer, template="r1-zero", max_prompt_tokens=1000,
                                    check_reference=lambda ref: missing_reference({"accuracy": 1.0}, ref), log=lambda _: None)
    assert [r.id for r in rows] == ["0", "6"] and rows[1].reference["answer"] == "6"
    assert rows[0].prompt.startswith(R1_ZERO_HEAD) and rows[0].prompt_ids == tokenizer(rows[0].prompt, add_special_tokens=False).input_ids
    assert report.kept == 2 and report.skipped == 5
    assert dict(report.reasons) == {"not JSON": 1, "empty prompt": 1, "a list prompt": 1, "prompt too long": 1,
                                    "no answer (the accuracy reward needs one)": 1}
    assert "line 4" in report.examples["prompt too long"][0]


def test_blank_lines_are_counted_and_a_source_without_rows_is_an_error(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n   \n" + json.dumps({"prompt": "b"}) + "\n")
    records = read_records(path)
    assert [r["prompt"] for r in records.rows] == ["a", "b"] and records.indices == [0, 3]
    assert dict(records.report.reasons) == {"blank line": 2} and records.report.examples["blank line"] == ["line 2", "line 3"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows \(the file is empty\)"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "text.jsonl").write_text("first line\nsecond line\n")
    with pytest.raises(DataError, match=r"text.jsonl: no usable rows: kept 0, skipped 2: 2 not JSON \(line 1: Expecting value; line 2"):
        read_records(tmp_path / "text.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        read_records(tmp_path / "empty.csv")
    (tmp_path / "objects.jsonl").write_text("{}\n{}\n")
    with pytest.raises(DataError, match=r"no prompt field \(looked for prompt, problem, question, instruction, input, query\); "
                                        r"its fields: \(none\)"):
        prompt_rows(read_records(tmp_path / "objects.jsonl"), pick_fields([], ("prompt",)), None)


def test_rows_needed_follow_the_rewards():
    mbpp = {"prompt": "Write f.", "test_list": ["assert f() == 1"]}
    assert missing_reference({"code": 1.0}, mbpp) is None
    assert "no tests" in missing_reference({"code": 1.0}, {"prompt": "Write f."})
    assert "no answer" in missing_reference({"accuracy": 1.0, "format": 0.1}, mbpp)
    assert missing_reference({"format": 1.0}, {}) is None


def test_r1_conversation_trains_only_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "<think> 1+2=3 </think> <answer> 3 </answer>"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<answer> 4 </answer>"},
    ]
    segments = render_conversation(messages, tokenizer)
    assert [trained for _, trained in segments] == [False, True, False, True]
    ids, mask = tokenize_segments(segments, tokenizer)
    trained = [i for i, m in zip(ids, mask) if m]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained) == f" {messages[1]['content']}{eos} {messages[3]['content']}{eos}"
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert untrained.startswith(R1_ZERO_HEAD) and untrained.endswith("User: What is 1 + 2? Assistant: User: What is 2 + 2? Assistant:")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_conversations_mask_everything_but_assistant_text(tokenizer, tmp_path):
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"},
                              {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 + 2?"},
                              {"role": "assistant", "content": "4"}]},
                {"messages": [{"role": "user", "content": "hi"}]},  # nothing to train
                {"messages": "not a list"}]
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        records = read_records(path)
        fields = pick_fields(records.columns, ("messages", "prompt", "response"))
        examples = sft_examples(records, fields, tokenizer, max_length=512)
        assert len(examples) == 1 and records.report.skipped == 2
        e = examples[0]
        full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
        assert tokenizer.decode(e.input_ids) == full
        assert tokenizer.decode([i for i, m in zip(e.input_ids, e.target_mask) if m]) == f"3{tokenizer.eos_token}4{tokenizer.eos_token}"
    finally:
        tokenizer.chat_template = None
