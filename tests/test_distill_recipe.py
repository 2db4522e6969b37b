"""`r1pipe run distill` end to end at reduced size (slow): a teacher from a shrunk R1-Zero run, both students'
bases, traces, SFT and logit distillation, RL alone, every eval and the comparison. Checks the comparison's
structure (every row with its interval, the margins paired over the same held-out problems) and the
equal-budget rule: each RL-alone student's optimizer steps and sampled tokens are at least its SFT's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL_BASE = ["steps=40", "eval_size=0", "cache_dir=null", "heldout_size=24", "train_size=96", "valid_size=16",
              "tokenizer_examples=2000"]
# recipes/r1-zero-tiny.yaml with a base long enough that some of its samples are right (traces to keep)
TEACHER = ["pretrain.steps=120", "pretrain.batch_size=32", "pretrain.eval_size=0", "--run-dir", "runs/r1-zero"]
SMALL_SFT = ["steps=4", "batch_size=8", "micro_batch_size=8", "checkpoint.every=4"]
SMALL_RL = ["steps=4", "rollout.prompts_per_step=4", "rollout.group_size=4", "algorithm.updates_per_step=2",
            "data.heldout_size=8", "checkpoint.every=4"]


def r1pipe(cwd: Path, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "r1pipe.cli", "run", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_distill_recipe_compares_students_at_equal_budgets(tmp_path: Path) -> None:
    r1pipe(tmp_path, "r1-zero-tiny", *TEACHER)  # runs/r1-zero: where the distill recipe looks for its teacher
    overrides = [*(f"{base}.{o}" for base in ("v3_base", "qwen_base") for o in SMALL_BASE),
                 *(f"{s}.{o}" for s in ("distill_v3", "distill_v3_kl", "distill_qwen") for o in SMALL_SFT),
                 *(f"{s}.{o}" for s in ("rl_v3", "rl_qwen") for o in SMALL_RL),
                 "traces.k=4", "traces.shard_size=48"]
    r1pipe(tmp_path, "distill", *overrides)
    run = tmp_path / "runs" / "distill"
    comparison = json.loads((run / "compare" / "comparison.json").read_text())
    rows = comparison["rows"]
    assert list(rows) == ["teacher", "v3-small base", "v3-small distilled (SFT)", "v3-small distilled (logit KL)",
                          "v3-small RL alone (R1-Zero)", "qwen2 base", "qwen2 distilled (SFT)", "qwen2 RL alone (R1-Zero)"]
    for label, row in rows.items():
        low, high = row["pass@1_interval"]
        assert row["n_problems"] == 24 and 0.0 <= low <= row["pass@1"] <= high <= 1.0, label
    assert rows["v3-small distilled (logit KL)"]["trained_by"] == "distill_v3_kl"
    # the equal-budget rule, from the stages' own counts
    budgets = {b["rl"]: b for b in comparison["budgets"]}
    for rl, sft in (("v3-small RL alone (R1-Zero)", "v3-small distilled (SFT)"), ("qwen2 RL alone (R1-Zero)", "qwen2 distilled (SFT)")):
        b = budgets[rl]
        assert b["sft"] == sft and b["holds"] is True
        assert b["rl_optimizer_steps"] >= b["sft_optimizer_steps"] == 4 and b["rl_tokens"] >= b["sft_tokens"] > 0
        # 4 steps x 2 updates at most: a step whose groups dynamic sampling all dropped takes no update
        assert rows[rl]["optimizer_steps"] == b["rl_optimizer_steps"] <= 8
    rl_summary = json.loads((run / "rl_v3" / "summary.json").read_text())
    assert rl_summary["sampled_tokens"] == budgets["v3-small RL alone (R1-Zero)"]["rl_tokens"]
    # margins: paired over the same 24 held-out problems
    margins = {(m["a"], m["b"]): m for m in comparison["margins"]}
    assert len(margins) == 5
    for (a, b), m in margins.items():
        assert m["n"] == 24 and m["low"] <= m["difference"] <= m["high"]
        assert m["difference"] == pytest.approx(rows[a]["pass@1"] - rows[b]["pass@1"])
    # every eval read the test split (the bases' heldout.jsonl), not the validation set the RL stages checked on
    for stage in {row["eval_stage"] for row in rows.values()}:
        ids = {json.loads(line)["id"] for line in (run / stage / "generations.jsonl").read_text().splitlines()}
        assert len(ids) == 24 and all(i.startswith("heldout-") for i in ids), stage
    markdown = (run / "compare" / "comparison.md").read_text()
    assert "v3-small distilled (logit KL)" in markdown and "95%" in markdown
