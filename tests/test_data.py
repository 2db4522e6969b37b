"""Synthetic problems, templates, JSONL reading and the BPE tokenizer."""
from __future__ import annotations

import json
import random
import re

import pytest

from r1pipe.data.jsonl import SkipReport, read_jsonl, read_jsonl_rows, write_jsonl
from r1pipe.data.synthetic import (
    KINDS, Problem, completion, corpus_texts, draw_splits, guess_answer, make_splits, problem_row, sample_problem, worked_add,
    worked_mul, worked_steps, worked_sub,
)
from r1pipe.data.templates import R1_MATH_SUFFIX, r1_math_prompt, r1_zero_prompt, render_prompt


def test_worked_steps_hand_checked():
    assert worked_add(347, 85) == "7+5=12 2 ; 4+8+1=13 32 ; 3+1=4 432"
    assert worked_add(95, 17) == "5+7=12 2 ; 9+1+1=11 112"
    assert worked_add(5, 120) == "5+0=5 5 ; 2=2 25 ; 1=1 125"
    assert worked_sub(141, 75) == "11-5=6 6 ; 14-7-1=6 66 ; 1-1=0 066"
    assert worked_sub(105, 98) == "15-8=7 7 ; 10-9-1=0 07 ; 1-1=0 007"
    assert worked_mul(347, 6) == "7*6=42 2 ; 4*6+4=28 82 ; 3*6+2=20 2082"
    assert worked_mul(10, 9) == "0*9=0 0 ; 1*9=9 90"


STEP = re.compile(r"^(\d+(?:[-+*]\d+)*)=(\d+) (\d+)$")


@pytest.mark.parametrize("kind", KINDS)
def test_worked_steps_are_right(kind):
    """Every step's arithmetic holds and the last running result is the answer."""
    rng = random.Random(kind)
    for _ in range(300):
        p = sample_problem(rng, [kind], 4)
        steps = worked_steps(p).split(" ; ")
        for step in steps:
            m = STEP.match(step)
            assert m, step
            assert eval(m.group(1)) == int(m.group(2)), (p, step)
        assert int(STEP.match(steps[-1]).group(3)) == p.answer, (p, steps)
        assert p.answer >= 0


def test_guess_answer_rate_and_digits():
    rng = random.Random(0)
    p = Problem("add", 347, 85)
    assert all(guess_answer(p, rng, 0.0) != 432 for _ in range(500))
    assert all(guess_answer(p, rng, 1.0) == 432 for _ in range(20))
    assert all(100 <= guess_answer(p, rng, 0.0) <= 999 for _ in range(200))  # as many digits as the answer
    hits = sum(guess_answer(p, rng, 0.3) == 432 for _ in range(4000)) / 4000
    assert abs(hits - 0.3) < 0.03


def test_completion_format():
    rng = random.Random(1)
    p = Problem("mul", 23, 4)
    worked = completion(p, True, rng, 0.0)
    assert worked == " <think> 3*4=12 2 ; 2*4+1=9 92 </think> <answer> 92 </answer>"
    guess = completion(p, False, rng, 0.0)
    assert re.fullmatch(r" <think> guess </think> <answer> \d+ </answer>", guess) and "92" not in guess


def test_splits_are_disjoint_and_seeded():
    heldout, train = make_splits(3, list(KINDS), 3, 200, 500)
    assert len(set(heldout)) == 200 and len(set(train)) == 500
    assert not set(heldout) & set(train)
    assert make_splits(3, list(KINDS), 3, 200, 500) == (heldout, train)
    assert make_splits(4, list(KINDS), 3, 200, 500)[0] != heldout
    exclude = set(heldout) | set(train)
    corpus = corpus_texts(4000, 5, list(KINDS), 3, 0.25, 0.1, exclude, tutor_fraction=0.4)
    expressions = {p.question[len("What is "):-1] for p in exclude}  # "347 + 85"
    for prompt, _ in corpus:
        expr = re.search(r"User: (?:What is|Work out) (\d+ [-+*] \d+)", prompt).group(1)
        assert expr not in expressions
    asked = [c for p, c in corpus if "User: What is" in p]
    tutored = [c for p, c in corpus if "User: Work out" in p]
    assert abs(len(tutored) / len(corpus) - 0.4) < 0.03
    assert all("guess" not in c for c in tutored)  # asked for the steps: always worked
    assert abs(sum("guess" not in c for c in asked) / len(asked) - 0.25) < 0.03
    row = problem_row(heldout[0], "h0")
    assert row["prompt"] == r1_zero_prompt(row["problem"]) and row["answer"] == str(heldout[0].answer)


def test_a_split_drawn_last_leaves_the_earlier_ones_and_is_disjoint_from_them():
    heldout, train = make_splits(3, list(KINDS), 2, 50, 120)
    with_valid = draw_splits(3, list(KINDS), 2, (50, 120, 40))
    assert with_valid[:2] == [heldout, train] and draw_splits(3, list(KINDS), 2, (50, 120, 0)) == [heldout, train, []]
    assert len(set(with_valid[2])) == 40 and not set(with_valid[2]) & (set(heldout) | set(train))


def test_splits_too_small_a_space_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        make_splits(0, ["mul"], 2, 700, 100)  # only 90 * 8 = 720 two-digit-times-digit problems


def test_templates():
    prompt = r1_zero_prompt("What is 2 + 2?")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert prompt.endswith("User: What is 2 + 2? Assistant:")
    assert "<think> </think>" in prompt and "<answer> </answer>" in prompt
    assert r1_math_prompt("Find x.") == "Find x.\n" + R1_MATH_SUFFIX
    assert R1_MATH_SUFFIX.endswith("within \\boxed{}.")
    assert render_prompt("q", "raw") == "q"
    assert render_prompt(prompt, "r1-zero") == prompt  # idempotent
    assert render_prompt("Find x.", "r1") == "Find x.\n" + R1_MATH_SUFFIX + "\n"
    with pytest.raises(ValueError, match="unknown template 'r2'"):
        render_prompt("q", "r2")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_prompt("q", "chat")


def test_jsonl_skips_and_counts_malformed_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "p1", "answer": 3}\n'
        "not json\n"
        "\n"
        "[1, 2]\n"
        '{"id": "b", "prompt": "p2"}\n'
        '{"prompt": "p3", "answer": "x"}\n'
    )
    report = SkipReport()
    rows, lines = read_jsonl_rows(path, report)
    assert [r["prompt"] for r in rows] == ["p1", "p2", "p3"] and lines == [0, 4, 5]
    assert report.skipped == 3 and dict(report.reasons) == {"not JSON": 1, "blank line": 1, "not a JSON object": 1}
    assert report.examples["not JSON"][0].startswith("line 2")
    out = tmp_path / "sub" / "w.jsonl"
    assert write_jsonl(out, rows) == 3
    assert read_jsonl(out) == rows and not (tmp_path / "sub" / "w.jsonl.tmp").exists()


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    from r1pipe.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    corpus = corpus_texts(3000, 0, list(KINDS), 3, 0.3, 0.1, set())
    tok = train_tokenizer((p + c for p, c in corpus), vocab_size=600)
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, path)
    return load_tokenizer(path), corpus


def test_tokenizer_loads_with_special_tokens_and_round_trips(trained_tokenizer):
    tok, corpus = trained_tokenizer
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for prompt, comp in corpus[:50]:
        ids = tok(prompt, add_special_tokens=False).input_ids + tok(comp, add_special_tokens=False).input_ids
        assert tok.decode(ids) == prompt + comp
    text = "Any text: naïve café ∑ 12345 \\boxed{7}"  # byte-level: nothing is unknown
    assert tok.decode(tok(text).input_ids) == text


def test_tokenizer_keeps_digits_apart_and_compresses_the_template(trained_tokenizer):
    tok, _ = trained_tokenizer
    ids = tok("9876543210", add_special_tokens=False).input_ids
    assert [tok.decode([i]) for i in ids] == list("9876543210")
    prompt = r1_zero_prompt("What is 347 + 85?")
    n = len(tok(prompt).input_ids)
    assert n <= 12, n  # ~400 characters of template become a token or two; digits and operator remain
