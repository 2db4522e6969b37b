"""All-scenario GRPO: a mixed math + code batch with per-row reward routing (math rows graded by
the accuracy reward, code rows by their tests in the sandbox), metrics per domain, and held-out
accuracy per domain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from r1pipe.data.jsonl import write_jsonl  # noqa: E402
from r1pipe.data.synthetic import CodeTask, Problem, code_row, math_row  # noqa: E402
from r1pipe.config import make_config  # noqa: E402
from r1pipe.stages.configs import GRPOConfig  # noqa: E402
from r1pipe.stages.grpo import run_grpo  # noqa: E402
from test_grpo_data import context, ray_cluster  # noqa: E402,F401  (the module's Ray instance)
from tiny_models import make_tiny_v3  # noqa: E402


def test_mixed_domain_batches_route_rewards_per_row(ray_cluster, tmp_path: Path) -> None:
    model = str(make_tiny_v3(tmp_path / "v3", max_position_embeddings=256))
    rows = []
    for i in range(4):
        rows.append(math_row(Problem("add", 10 + i, 3), f"m{i}"))
        rows.append(code_row(CodeTask(Problem("add", 20 + i, 4)), f"c{i}"))
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, rows)
    cfg = make_config(GRPOConfig, {
        "data": {"train_path": str(data), "heldout_path": str(data), "template": "r1-zero", "heldout_size": 8}, "steps": 1,
        "rollout": {"prompts_per_step": 8, "group_size": 2, "max_tokens": 8, "dynamic_sampling": False},
        "rewards.weights": {"accuracy": 1.0, "code": 1.0, "format": 0.1}, "checkpoint.every": 1})
    run_grpo(cfg, context(tmp_path, model))
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["data"]["train_path"]["kept"] == 8 and summary["data"]["train_path"]["skipped"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if m["step"] == 1 and "reward/mean" in m)
    # code rows never meet the accuracy reward (it would fail on a row without an answer), nor math rows the tests
    assert step["reward/errors"] == 0
    assert step["domain_share/math"] == 0.5 and step["domain_share/code"] == 0.5
    for key in ("accuracy/math", "accuracy/code", "heldout_accuracy/math", "heldout_accuracy/code"):
        assert 0.0 <= step[key] <= 1.0, key
    assert set(summary["final_accuracy_by_domain"]) == {"math", "code"}
    assert metrics[0]["step"] == 0 and "heldout_accuracy/code" in metrics[0]
