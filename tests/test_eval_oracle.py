"""Oracle checks of the grading path: gold answers and reference programs score 100%, empty or
shuffled responses score (near) 0, on every shipped suite, through `evaluate(responses=...)`."""
import json

import pytest

from r1pipe.eval import evaluate, load_suite
from r1pipe.eval.suites import MATH_SUITES

pytest.importorskip("r1pipe.rewards.code")
pytestmark = pytest.mark.usefixtures("ray_cluster")  # evaluate grades on a RewardPool in it (conftest)


def write_responses(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score(tmp_path, suite, responses, tag, **options):
    path = write_responses(tmp_path / f"{tag}.jsonl", responses)
    report = evaluate(None, suite, tmp_path / tag, responses=path, show=False, **options)
    return report["suites"][suite]


def test_gold_answers_in_boxed_score_100_on_every_math_suite(tmp_path):
    rows = []
    for name in MATH_SUITES:
        for p in load_suite(name).problems:
            gold = p.reference["answer"]
            rows.append({"suite": name, "id": p.id, "response": f"Some reasoning.\nSo the answer is $\\boxed{{{gold}}}$."})
            rows.append({"suite": name, "id": p.id, "response": ""})  # a second sample: empty
    path = write_responses(tmp_path / "gold.jsonl", rows)
    report = evaluate(None, list(MATH_SUITES), tmp_path / "gold", responses=path, show=False, grade_threads=2)
    for name in MATH_SUITES:
        entry = report["suites"][name]
        assert entry["n_problems"] == len(load_suite(name)) and entry["k"] == 2 and entry["grader_errors"] == 0
        assert entry["pass@1"] == pytest.approx(0.5), name  # the gold sample right, the empty one wrong
        assert entry["pass@k"] == 1.0 and entry["cons@k"] == 1.0, name  # the empty sample does not vote
    lines = (tmp_path / "gold" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * sum(len(load_suite(n)) for n in MATH_SUITES)
    first = json.loads(lines[0])
    assert first["suite"] == "gsm8k" and first["extracted"] == first["gold"] == "18" and first["score"] == 1.0


def test_empty_and_shifted_answers_score_zero(tmp_path):
    problems = load_suite("aime24").problems
    empty = [{"id": p.id, "response": ""} for p in problems]
    assert score(tmp_path, "aime24", empty, "empty")["pass@1"] == 0.0
    # every problem answered with the next problem's gold (all 30 AIME answers differ)
    shifted = [{"id": p.id, "response": f"\\boxed{{{q.reference['answer']}}}"} for p, q in zip(problems, problems[1:] + problems[:1])]
    entry = score(tmp_path, "aime24", shifted, "shifted")
    assert entry["pass@1"] == 0.0 and entry["cons@k"] == 0.0


def test_r1_zero_answers_are_graded(tmp_path):
    problems = load_suite("math500").problems[:40]
    rows = [{"id": p.id, "response": f" <think> work </think> <answer> {p.reference['answer']} </answer>"} for p in problems]
    entry = score(tmp_path, "math500", rows, "r1zero", limit=40)
    assert entry["n_problems"] == 40 and entry["pass@1"] == 1.0


def check_reference_programs(tmp_path, stride):
    """Every `stride`-th problem of HumanEval and MBPP with its reference program: 100%."""
    humaneval = load_suite("humaneval").problems[::stride]
    rows = [{"id": p.id, "response": f"<think>easy</think>\n```python\n{p.reference['prompt']}{p.reference['canonical_solution']}```"}
            for p in humaneval]
    rows += [{"id": p.id, "response": ""} for p in humaneval]  # a second, empty sample each
    entry = score(tmp_path, "humaneval", rows, "humaneval", grade_threads=2)
    assert entry["n_problems"] == len(humaneval) and entry["k"] == 2 and entry["grader_errors"] == 0
    assert entry["pass@1"] == pytest.approx(0.5) and entry["pass@k"] == 1.0
    assert "cons@k" not in entry

    mbpp = load_suite("mbpp").problems[::stride]
    rows = [{"id": int(p.id), "response": f"```python\n{p.reference['code']}\n```"} for p in mbpp]
    entry = score(tmp_path, "mbpp", rows, "mbpp", grade_threads=2)
    assert entry["n_problems"] == len(mbpp) and entry["pass@1"] == 1.0


def test_reference_programs_pass_code_suites_sample(tmp_path):
    check_reference_programs(tmp_path, stride=10)  # 17 + 43 programs: the default suite's share


@pytest.mark.slow
def test_reference_programs_pass_every_code_problem(tmp_path):
    check_reference_programs(tmp_path, stride=1)  # all 164 + 427 (about a minute on 2 cores)


def test_wrong_and_empty_programs_fail(tmp_path):
    humaneval = load_suite("humaneval").problems[:6]
    rows = [{"id": p.id, "response": ""} for p in humaneval]
    rows += [{"id": p.id, "response": f"```python\n{p.reference['prompt']}    return None\n```"} for p in humaneval]
    entry = score(tmp_path, "humaneval", rows, "wrong", limit=6)
    assert entry["pass@1"] == 0.0 and entry["pass@k"] == 0.0


def test_equivalent_forms_are_graded_by_the_math_verifier(tmp_path):
    cases = [("\\frac{1}{2}", "0.5", 1.0), ("\\frac{14}{3}", "14/3", 1.0), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", 1.0),
             ("10\\%", "10", 1.0), ("x^2+2x+1", "(x+1)^2", 1.0), ("27", "26", 0.0), ("\\sqrt{2}", "2", 0.0)]
    suite = tmp_path / "forms.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": gold}) + "\n" for i, (gold, _, _) in enumerate(cases)))
    responses = write_responses(tmp_path / "r.jsonl", [{"id": i, "response": f"\\boxed{{{pred}}}"} for i, (_, pred, _) in enumerate(cases)])
    from r1pipe.eval import load_suite_file

    evaluate(None, [load_suite_file(suite, id_field=None)], tmp_path / "out", responses=responses, show=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [want for _, _, want in cases]
