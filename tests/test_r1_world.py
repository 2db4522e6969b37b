"""The R1 world of the synthetic task generator: readable and mixed steps, code tasks graded in
the sandbox, and a cold-start set whose every solution is right and readable."""
import random

from r1pipe.data.synthetic import (
    CodeTask, Problem, code_row, cold_start_rows, r1_completion, r1_corpus_texts, readable_steps, summary,
)
from r1pipe.rewards import build_reward_fn
from r1pipe.rewards.format import chain_of_thought
from r1pipe.rewards.language import language_share
from r1pipe.rewards.readability import FILTERS, build_filters


def test_readable_and_mixed_steps() -> None:
    p = Problem("add", 347, 85)
    assert readable_steps(p) == "step 7+5=12 keep 2 ; step 4+8+1=13 keep 32 ; step 3+1=4 keep 432"
    # a drift: the first step in English, then the second script for good
    assert readable_steps(p, random.Random(0), 1.0) == "step 7+5=12 keep 2 ; 步 4+8+1=13 留 32 ; 步 3+1=4 留 432"
    drifted = [readable_steps(p, random.Random(seed), 0.5) for seed in range(200)]
    assert set(drifted) == {readable_steps(p), "step 7+5=12 keep 2 ; 步 4+8+1=13 留 32 ; 步 3+1=4 留 432",
                            "step 7+5=12 keep 2 ; step 4+8+1=13 keep 32 ; 步 3+1=4 留 432"}
    assert summary(p) == "so 347 + 85 = 432"
    assert summary(p, code=True) == "so 347 + 85 = 432 and f(x) = x + 432"  # the function, right before the program
    text = r1_completion(p, worked=True, rng=random.Random(0), guess_correct=0.0, with_summary=True)
    assert text == " <think> step 7+5=12 keep 2 ; step 4+8+1=13 keep 32 ; step 3+1=4 keep 432 ; so 347 + 85 = 432 </think> <answer> 432 </answer>"


def test_corpus_mixes_scripts_in_the_given_share() -> None:
    corpus = r1_corpus_texts(2000, 0, ["add", "sub"], 2, worked_fraction=1.0, guess_correct=0.0, exclude=set(),
                             tutor_fraction=0.5, mix_fraction=0.4, mix_prob=1.0, code_fraction=0.25)
    mixed = [language_share(chain_of_thought(c), "en") < 1.0 for _, c in corpus]
    code = sum("Write a Python function" in q for q, _ in corpus) / len(corpus)
    assert 0.35 < sum(mixed) / len(corpus) < 0.45 and 0.2 < code < 0.3
    # a drift keeps the first step in English: every mixed chain is part English, part second script
    assert all(0.0 < language_share(chain_of_thought(c), "en") < 1.0 for (_, c), m in zip(corpus, mixed) if m)


def test_code_tasks_pass_only_with_the_right_constant() -> None:
    task = CodeTask(Problem("sub", 47, 12))
    row = code_row(task, "c0")
    assert row["domain"] == "code" and row["test_list"][0] == "assert f(0) == 35"
    fn = build_reward_fn({"code": 1.0})
    right = r1_completion(task.problem, worked=True, rng=random.Random(0), guess_correct=0.0, code=True)
    assert "def f(x): return x + 35" in right and fn(right, row).components["code"] == 1.0
    assert fn(right.replace("+ 35", "+ 36"), row).components["code"] == 0.0


def test_cold_start_is_right_and_readable() -> None:
    exclude = {Problem("add", 12, 3)}
    rows = cold_start_rows(40, 0, ["add", "sub"], 2, exclude, code_fraction=0.3)
    fn = build_reward_fn({"accuracy": 1.0, "code": 1.0, "format": 1.0})
    filters = build_filters({name: {} for name in FILTERS})
    assert len({(r["domain"], p) for p, r in rows}) == 40 and not exclude & {p for p, _ in rows}
    assert {r["domain"] for _, r in rows} == {"math", "code"}
    for p, r in rows:
        ref = {"answer": str(p.answer), "domain": "math"} if r["domain"] == "math" else code_row(CodeTask(p), "x")
        result = fn(" " + r["response"], ref)
        assert result.components["format"] == 1.0 and result.components["code" if r["domain"] == "code" else "accuracy"] == 1.0
        assert all(f(r["response"], ref) for f in filters), (r, [f.name for f in filters if not f(r["response"], ref)])
        assert summary(p, code=r["domain"] == "code") in r["response"]
