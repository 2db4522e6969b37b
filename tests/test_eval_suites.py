"""Shipped suites load with the MANIFEST's counts and golds; user files are read tolerantly."""
import gzip
import json

import pytest

from r1pipe.eval.report import SuiteResult, markdown
from r1pipe.eval.runner import read_responses
from r1pipe.eval.suites import REGISTRY, data_path, integer_gold, load_suite, load_suite_file, resolve_suites
from r1pipe.rewards import extract_gsm8k_gold
from r1pipe.eval.templates import render, resolve_template

COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40, "humaneval": 164, "mbpp": 427}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_suite_counts_and_unique_ids(name):
    suite = load_suite(name)
    assert len(suite) == COUNTS[name] and suite.skipped == 0
    assert len({p.id for p in suite.problems}) == len(suite)


def test_shipped_files_carry_provenance_and_licences():
    manifest = data_path("MANIFEST.md").read_text()
    licences = data_path("LICENSES.md").read_text()
    for name, spec in REGISTRY.items():
        assert spec.file in manifest
    assert "CC-BY-4.0" in licences and "MIT" in licences
    assert not data_path("gsm8k/train.jsonl").exists()  # the test split only
    with gzip.open(data_path("humaneval/HumanEval.jsonl.gz"), "rt") as f:
        assert json.loads(f.readline())["task_id"] == "HumanEval/0"


def test_golds_and_ids_follow_the_sources():
    gsm8k = load_suite("gsm8k")
    assert gsm8k.problems[0].id == "0" and gsm8k.problems[0].reference == {"answer": "18"}
    assert all("," not in p.reference["answer"] for p in gsm8k.problems)
    assert extract_gsm8k_gold("so 1,000 + 234\n#### 1,234") == "1234"
    aime = load_suite("aime24")
    assert {p.reference["answer"] for p in aime.problems} >= {"25", "204"}  # '025' read as 25
    amc = load_suite("amc23")
    assert amc.problems[0].reference["answer"] == "27"
    assert integer_gold(27.0) == "27" and integer_gold(0.5) == "0.5" and integer_gold("\\frac{1}{2}") == "\\frac{1}{2}"
    assert load_suite("humaneval").problems[0].id == "HumanEval/0"
    assert load_suite("mbpp").problems[0].id == "2"


def test_suite_groups_and_unknown_names():
    assert [s.name for s in resolve_suites("math")] == ["gsm8k", "math500", "aime24", "amc23"]
    assert [s.name for s in resolve_suites("aime24,aime24, amc23")] == ["aime24", "amc23"]
    with pytest.raises(KeyError, match="gsm9k"):
        resolve_suites("gsm9k")


def test_user_suite_file_skips_and_counts_malformed_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "\n".join([
            json.dumps({"q": "1+1?", "a": 2}),
            "{not json",
            json.dumps({"q": "no answer"}),
            json.dumps({"q": "", "a": 1}),
            json.dumps({"q": "gsm style", "a": "work\n#### 3,000"}),
            json.dumps(["a list"]),
        ]) + "\n"
    )
    suite = load_suite_file(path, prompt_field="q", answer_field="a", id_field=None)
    assert suite.name == "mine" and suite.skipped == 4
    assert [(p.id, p.reference["answer"]) for p in suite.problems] == [("0", "2"), ("4", "3000")]
    with pytest.raises(FileNotFoundError):
        load_suite_file(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="kind"):
        load_suite_file(path, kind="essay")


def test_templates_per_model_kind():
    problem = load_suite("gsm8k").problems[0]
    suite = load_suite("gsm8k")
    assert resolve_template("auto", None) == "r1-zero"
    zero = render(suite, problem, "r1-zero")
    assert zero.text.endswith("Assistant:") and problem.question.strip() in zero.text and zero.stop == ("</answer>",)
    plain = render(suite, problem, "r1")
    assert "put your final answer within \\boxed{}" in plain.text

    class ChatTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    tok = ChatTokenizer()
    assert resolve_template("auto", tok) == "r1"
    chat = render(suite, problem, "r1", tok)
    assert chat.text.startswith("<user>") and "\\boxed{}" in chat.text
    humaneval = load_suite("humaneval")
    assert humaneval.problems[0].reference["prompt"].strip() in render(humaneval, humaneval.problems[0], "r1").text


def test_read_responses_groups_samples_by_id(tmp_path):
    suites = resolve_suites("aime24,amc23")
    path = tmp_path / "r.jsonl"
    rows = [{"suite": "aime24", "id": 60, "response": "a"}, {"suite": "aime24", "id": "60", "response": "b"},
            {"suite": "amc23", "id": 0, "response": "c"}, {"suite": "other", "id": 0, "response": "x"},
            {"id": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    grouped, skipped = read_responses(path, suites)
    assert grouped == {"aime24": {"60": ["a", "b"]}, "amc23": {"0": ["c"]}}
    assert skipped.skipped == 2 and skipped.kept == 4
    assert dict(skipped.reasons) == {"not JSON": 1, "no 'id' and string 'response'": 1}
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": 0, "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="suite"):  # which of the two suites is ambiguous
        read_responses(tmp_path / "s.jsonl", suites)
    assert read_responses(tmp_path / "s.jsonl", suites[:1])[0] == {"aime24": {"0": ["x"]}}


def test_markdown_report_lists_every_suite():
    results = [SuiteResult("gsm8k", "math", 3, 4, {"pass@1": 0.5, "cons@k": 2 / 3, "pass@k": 1.0}),
               SuiteResult("mbpp", "mbpp", 2, 1, {"pass@1": 0.0, "pass@k": 0.0}, grader_errors=1)]
    text = markdown(results, {"mode": "generate"})
    assert "| gsm8k | 3 | 4 | 50.0 | 66.7 | 100.0 |" in text
    assert "| mbpp | 2 | 1 | 0.0 | - | 0.0 |" in text and "grader_errors 1" in text
