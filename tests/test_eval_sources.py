"""`r1pipe eval --suite-file` on any data-layer source with its fields auto-detected: a JSONL, a
Parquet file and a save_to_disk directory with `problem` / `answer` columns, re-scored from saved
responses (hand-checked: two of three right)."""
from __future__ import annotations

import json

import datasets
import pytest

from r1pipe.cli import main as r1pipe_main

ROWS = [
    {"problem": "What is 2 + 3?", "answer": "5"},
    {"problem": "Simplify 6/8.", "answer": "\\frac{3}{4}"},
    {"problem": "What is 10 - 4?", "answer": "6"},
]
RESPONSES = [
    {"id": 0, "response": "<think> 2+3=5 </think> <answer> 5 </answer>"},
    {"id": 1, "response": "<think> divide by 2 </think> <answer> 0.75 </answer>"},
    {"id": "2", "response": "<think> guess </think> <answer> 7 </answer>"},
]


def write_source(tmp_path, kind: str) -> str:
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        path = tmp_path / "suite.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "parquet":
        path = tmp_path / "suite.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "suite_disk"
        ds.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_suite_file_with_problem_answer_fields_rescores(ray_cluster, tmp_path, kind, capsys):
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in RESPONSES))
    out = tmp_path / "out"
    rc = r1pipe_main(["eval", "--suite-file", write_source(tmp_path, kind), "--suite-name", "mine",
                      "--responses", str(responses), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "prompt='problem' (auto), answer='answer' (auto)" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["suites"]["mine"]
    assert report["n_problems"] == 3 and report["pass@1"] == pytest.approx(2 / 3)


def test_suite_file_explicit_field_that_is_absent_names_the_option(tmp_path, capsys):
    rc = r1pipe_main(["eval", "--suite-file", write_source(tmp_path, "jsonl"), "--answer-field", "gold",
                      "--responses", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--answer-field='gold'" in capsys.readouterr().err


def test_eval_stage_takes_any_source_as_a_suite(tmp_path):
    from omegaconf import OmegaConf

    from r1pipe.stages.base import StageContext
    from r1pipe.stages.configs import EvalConfig
    from r1pipe.stages.evaluate import resolve_suite_list

    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "eval", recipe=OmegaConf.create({}), seed=0)
    disk = write_source(tmp_path, "disk")
    suites = resolve_suite_list(EvalConfig(suites=[disk, "aime24"]), ctx)
    assert [len(s) for s in suites] == [3, 30] and suites[0].problems[1].reference["answer"] == "\\frac{3}{4}"
