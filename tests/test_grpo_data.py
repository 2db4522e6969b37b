"""GRPO inputs through the data layer: bad rows are skipped and counted on the driver before any
actor starts (the run finishes), the template is applied, reward options reach the rewards, and
the rows a run needs follow its rewards (a code reward needs tests, not an answer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ray = pytest.importorskip("ray")

from r1pipe.data.templates import R1_ZERO_HEAD  # noqa: E402
from r1pipe.eval.suites import data_path  # noqa: E402
from r1pipe.stages.base import StageContext  # noqa: E402
from r1pipe.config import make_config  # noqa: E402
from r1pipe.stages.configs import GRPOConfig  # noqa: E402
from r1pipe.stages.grpo import GRPOTrainer, run_grpo  # noqa: E402
from tiny_models import make_tiny_v3  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_v3(tmp_path_factory.mktemp("grpo_data") / "v3", max_position_embeddings=256))


def context(run_dir: Path, model: str) -> StageContext:
    recipe = OmegaConf.create({"cluster": {"num_cpus": 2}, "model": {"path": model}})
    return StageContext(run_dir=run_dir, stage_dir=run_dir / "rl", recipe=recipe, seed=0)


def write_bad_problems(path: Path) -> Path:
    good = [json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(6)]
    bad = [
        json.dumps({"problem": "", "answer": "1"}),
        json.dumps({"problem": ["What is", "1 + 1?"], "answer": "2"}),
        json.dumps({"problem": "What is 1 + 1? " * 300, "answer": "2"}),  # beyond max_model_len 256
        '{"problem": "What is 2 + 2?", "answer": ',
        json.dumps({"problem": "What is 3 + 3?"}),
    ]
    path.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    return path


def test_bad_rows_are_skipped_counted_and_the_run_finishes(ray_cluster, model, tmp_path):
    data = write_bad_problems(tmp_path / "problems.jsonl")
    cfg = make_config(GRPOConfig, {
        "data": {"train_path": str(data), "heldout_path": str(data), "template": "r1-zero"}, "steps": 1,
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_tokens": 8, "dynamic_sampling": False},
        "rewards.weights": {"accuracy": 1.0, "format": 0.1}, "rewards.options": {"extract_mode": "answer_tag"},
        "checkpoint.every": 1})
    out = run_grpo(cfg, context(tmp_path, model))
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    train = summary["data"]["train_path"]
    assert train["kept"] == 6 and train["skipped"] == 5
    assert train["reasons"] == {"not JSON": 1, "empty prompt": 1, "a list prompt": 1, "prompt too long": 1,
                                "no answer (the accuracy reward needs one)": 1}
    assert out["steps"] == 1 and out["final_accuracy"] is not None


def test_template_fields_and_reward_options_reach_the_rows(model, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "final_answer": 5, "uid": "x1"}) + "\n")
    cfg = make_config(GRPOConfig, {"data.template": "r1-zero", "data.id_field": "uid", "rollout.max_tokens": 8})
    trainer = GRPOTrainer(cfg, context(tmp_path, model))
    [row] = trainer._problems("train_path", str(data), model)
    assert row["prompt"].startswith(R1_ZERO_HEAD) and row["prompt"].endswith("User: What is 2 + 3? Assistant:")
    assert row["answer"] == "5" and row["id"] == "x1"
    bad = GRPOTrainer(make_config(GRPOConfig, {"rewards.options": {"extract_mod": "boxed"}}), context(tmp_path, model))
    with pytest.raises(ValueError, match="rl.rewards.options.*extract_mod"):
        bad._check_reward_options()


def test_a_code_reward_run_needs_tests_not_answers(ray_cluster, model, tmp_path):
    """GRPO on a small MBPP file with reward_weights {code: 1}: rows need tests, not an answer."""
    rows = [json.loads(line) for line in data_path("mbpp/sanitized-mbpp.jsonl").read_text().splitlines()[:4]]
    rows.append({"prompt": "Write a function that returns 1."})  # no tests: skipped
    data = tmp_path / "mbpp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(GRPOConfig, {
        "data": {"train_path": str(data), "heldout_path": str(data), "prompt_field": "prompt", "template": "raw"},
        "steps": 1, "rollout": {"prompts_per_step": 2, "group_size": 2, "max_tokens": 8, "stop": [], "dynamic_sampling": False},
        "rewards": {"weights": {"code": 1.0}, "accuracy_reward": "code"}, "checkpoint.every": 1})
    out = run_grpo(cfg, context(tmp_path, model))
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["data"]["train_path"]["kept"] == 4
    assert summary["data"]["train_path"]["reasons"] == {"no tests (the code reward needs entry_point+test, test_list or inputs+outputs)": 1}
    assert out["final_accuracy"] == 0.0  # a random tiny model writes no passing program
