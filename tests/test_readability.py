"""Readability filters, sample selection and per-row reward routing, checked by hand."""
import pytest

from r1pipe.rewards import build_reward_fn, missing_reference, routed_rewards
from r1pipe.rewards.readability import FILTERS, build_filters, readability
from r1pipe.rewards import graders_of, solved
from r1pipe.stages.rejection_sample import select_samples

CLEAN = " <think> step 7+5=12 keep 2 ; step 4+8+1=13 keep 32 ; so 47 + 85 = 132 </think> <answer> 132 </answer>"
MIXED = " <think> 步 7+5=12 留 2 ; step 4+8+1=13 keep 32 </think> <answer> 132 </answer>"
MATH = {"answer": "132", "domain": "math"}
CODE = {"test_list": ["assert f(0) == 1"], "domain": "code"}


def run(name: str, text: str, ref: dict, **params) -> bool:
    (f,) = build_filters({name: params})
    return f(text, ref)


def test_language_consistency_threshold() -> None:
    assert run("language_consistency", CLEAN, MATH)
    # MIXED's chain of thought: 2 Han words, then step keep (Latin): 2 of 4 in English
    assert not run("language_consistency", MIXED, MATH)
    assert run("language_consistency", MIXED, MATH, min_share=0.5)
    assert not run("language_consistency", MIXED, MATH, min_share=0.51)
    assert run("language_consistency", " <think> 步 留 </think> <answer> 1 </answer>", {**MATH, "language": "zh"})


def test_no_mixed_scripts() -> None:
    assert run("no_mixed_scripts", CLEAN, MATH)
    assert not run("no_mixed_scripts", MIXED, MATH)
    assert not run("no_mixed_scripts", "Привет world", MATH)
    assert run("no_mixed_scripts", "漢字とかな", MATH)  # Han + Kana: Japanese, one language
    assert run("no_mixed_scripts", "12 + 7 = 19", MATH)  # no letters at all


def test_length_and_paragraphs() -> None:
    assert run("length", "abcd", MATH, min_chars=4, max_chars=4)
    assert not run("length", "abc", MATH, min_chars=4)
    assert not run("length", "abcde", MATH, max_chars=4)
    assert run("length", "x" * 10**5, MATH, max_chars=0)
    assert run("paragraph_length", "aaaa\n\nbbbb", MATH, max_chars=4)
    assert not run("paragraph_length", "aaaaa\n\nbbbb", MATH, max_chars=4)


def test_no_repeated_paragraphs() -> None:
    assert run("no_repeated_paragraphs", "first idea here\n\nsecond idea here", MATH)
    assert not run("no_repeated_paragraphs", "same idea here\n\n  same   idea here ", MATH)
    assert run("no_repeated_paragraphs", "ok\n\nok", MATH)  # shorter than min_chars
    steps = "step 1+1=2 keep 2 ; step 1+1=2 keep 2"
    assert run("no_repeated_paragraphs", steps, MATH)
    assert not run("no_repeated_paragraphs", steps, MATH, split=" ; ")


def test_no_code_in_math() -> None:
    assert run("no_code_in_math", CLEAN, MATH)
    assert not run("no_code_in_math", " <think> a </think> <answer> def f(x): return x </answer>", MATH)
    assert not run("no_code_in_math", "so:\n```python\nprint(1)\n```", MATH)
    assert not run("no_code_in_math", "import math\nmath.sqrt(2)", {"answer": "1"})
    assert run("no_code_in_math", " <answer> def f(x): return x </answer>", CODE)
    assert run("no_code_in_math", "the default value is 3", MATH)


def test_build_filters_names_bad_keys() -> None:
    assert [f.name for f in build_filters({k: {} for k in FILTERS})] == list(FILTERS)
    with pytest.raises(ValueError, match="unknown filter 'no_emoji'"):
        build_filters({"no_emoji": {}})
    with pytest.raises(ValueError, match="min_shar"):
        build_filters({"language_consistency": {"min_shar": 0.9}})


def test_readability_figures() -> None:
    r = readability([CLEAN, MIXED, "132"], [MATH, MATH, MATH], [10, 20, 3])
    assert r.format_compliance == pytest.approx(2 / 3)
    assert r.language_consistency == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert r.mixed_script_share == pytest.approx(1 / 3)
    assert r.summary_share == pytest.approx(1 / 3)  # only CLEAN closes with "so ..."
    assert r.mean_length == pytest.approx(11.0)


def test_select_samples() -> None:
    texts = ["aaaa aaaa", "aaaa aaab", "zzzz yyyy", "b"]
    lengths = [9, 9, 9, 1]
    assert select_samples(texts, lengths, 2, "first") == [0, 1]
    assert select_samples(texts, lengths, 2, "shortest") == [3, 0]
    # diverse: the shortest first, then the text farthest from it, then the farthest from both
    picked = select_samples(texts, lengths, 3, "diverse")
    assert picked[0] == 3 and set(picked[1:]) <= {0, 1, 2} and not {0, 1} <= set(picked)
    assert select_samples(texts, lengths, 10, "diverse") == select_samples(texts, lengths, 4, "diverse")
    assert len(select_samples(texts, lengths, 10, "diverse")) == 4
    assert select_samples([], [], 2, "diverse") == []


def test_reward_routing() -> None:
    names = ["accuracy", "code", "format", "language"]
    assert routed_rewards(names, MATH) == ["accuracy", "format", "language"]
    assert routed_rewards(names, CODE) == ["code", "format", "language"]
    assert routed_rewards(names, {"domain": "chat"}) == ["format", "language"]
    assert routed_rewards(names, {"rewards": ["format"]}) == ["format"]
    assert routed_rewards(names, {"answer": "3"}) == ["accuracy", "format", "language"]  # inferred math
    assert routed_rewards(names, {"test_list": ["assert 1"]}) == ["code", "format", "language"]  # inferred code
    assert routed_rewards(names, {}) == names
    assert missing_reference(names, MATH) is None and missing_reference(names, CODE) is None
    assert "no tests" in missing_reference(names, {"domain": "code"})
    assert "no answer" in missing_reference(names, {"domain": "math"})
    assert "list of reward names" in missing_reference(names, {"rewards": "format"})
    assert graders_of(names, MATH) == ["accuracy"] and graders_of(names, CODE) == ["code"]
    assert solved({"accuracy": 1.0, "code": 0.0}, MATH, names) and not solved({"accuracy": 1.0, "code": 0.0}, CODE, names)
    assert not solved({"format": 1.0}, {"domain": "chat"}, names)  # no grader: never counted solved
    fn = build_reward_fn({"accuracy": 1.0, "code": 1.0, "format": 0.5})
    r = fn(CLEAN, MATH)
    assert r.components == {"accuracy": 1.0, "format": 1.0} and r.total == pytest.approx(1.5)
    assert not r.info["errors"]


def test_code_reward_reads_the_answer_block() -> None:
    fn = build_reward_fn({"code": 1.0})
    ref = {"test_list": ["assert f(0) == 35", "assert f(3) == 38"], "domain": "code"}
    good = " <think> step 7-2=5 keep 5 </think> <answer> def f(x): return x + 35 </answer>"
    assert fn(good, ref).components == {"code": 1.0}
    assert fn(good.replace("35", "34"), ref).components == {"code": 0.0}
    assert fn(" <think> a </think> <answer> 35 </answer>", ref).components == {"code": 0.0}


def test_ends_with_summary() -> None:
    assert run("ends_with_summary", CLEAN, MATH)
    assert not run("ends_with_summary", MIXED, MATH)  # steps only
    assert not run("ends_with_summary", " <think> so 1 + 1 = 2 </think> <answer> 2 </answer>", MATH)  # nothing summarised
    assert run("ends_with_summary", "<think>Add the units.\nThen the tens.\n**Therefore**, 132.</think>", MATH)
    assert not run("ends_with_summary", " <think> step 1+1=2 keep 2 ; something 2 </think>", MATH)
    assert not run("ends_with_summary", " <think> step 1+1=2 keep 2 ; sooner 2 </think>", MATH)  # a word, not "so"
    assert run("ends_with_summary", " <think> a ; 所以 2 </think>", MATH)
