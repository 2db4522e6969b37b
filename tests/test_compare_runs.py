"""bench/compare_r1_runs.py and bench/compare_distill_runs.py on hand-made run directories: the paired figures
come from the runs' answer files (checked by hand), seeds pair by run.seed, each distill run's comparison is read
as written, and the PNGs are drawn."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_r1_runs.py"
READABLE = {"format_compliance": 1.0, "summary_share": 1.0, "language_consistency": 1.0, "mixed_script_share": 0.0,
            "mean_length": 30.0}


def fake_run(path: Path, seed: int, stages: dict[str, dict[str, list[int]]]) -> Path:
    """A finished run: per stage, the ids solved per domain out of 10 problems each."""
    (path / "scorecard").mkdir(parents=True)
    (path / "config.yaml").write_text(f"run:\n  name: {path.name}\n  seed: {seed}\n")
    per_stage = {}
    for stage, solved in stages.items():
        rows = [{"id": f"{d}-{i}", "domain": d, "solved": i in solved[d], "text": "x"} for d in solved for i in range(10)]
        (path / "scorecard" / f"{stage}.answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        per_stage[stage] = {"accuracy": {d: len(s) / 10 for d, s in solved.items()}, "n": {d: 10 for d in solved}, **READABLE}
    (path / "summary.json").write_text(json.dumps({"stages": [*stages, "scorecard"], "per_stage": per_stage}))
    return path


def compare(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_paired_test_and_intervals_come_from_the_answer_files(tmp_path: Path) -> None:
    r1 = [fake_run(tmp_path / f"r1-s{s}", s, {"pretrain": {"math": [0], "code": [0]},
                                               "sft": {"math": list(range(8)), "code": list(range(6))},
                                               "all_rl": {"math": list(range(8)), "code": list(range(5))}}) for s in (0, 1)]
    zero = [fake_run(tmp_path / f"zero-s{s}", s, {"pretrain": {"math": [0], "code": [0]},
                                                   "zero_rl": {"math": [0, 1, 2, 3, 9], "code": list(range(5))}}) for s in (0, 1)]
    png = tmp_path / "out.png"
    done = compare("--r1", *r1, "--r1-zero", *zero, "--png", png)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # seed 0, math: R1 solves 0-7, R1-Zero 0-3 and 9: 4 vs 1 discordant, p = 2 (C(5,0) + C(5,1)) / 2^5 = 0.375;
    # differences +1 x4, -1 x1, 0 x5: mean 0.3, sample sd 0.67495, half-width 1.96 * 0.67495 / sqrt(10) = 0.41834
    math0 = result["paired"]["seed 0"]["math"]
    assert (math0["a_only"], math0["b_only"], math0["n"]) == (4, 1, 10)
    assert math0["p_value"] == pytest.approx(0.375)
    assert math0["difference"] == pytest.approx(0.3)
    assert (math0["low"], math0["high"]) == pytest.approx((0.3 - 0.41834, 0.3 + 0.41834), abs=1e-4)
    # both seeds pooled: 8 vs 2 discordant out of 20, p = 2 (1 + 10 + 45) / 1024
    both = result["paired"]["all seeds"]["math"]
    assert (both["a_only"], both["b_only"], both["n"]) == (8, 2, 20)
    assert both["p_value"] == pytest.approx(112 / 1024)
    # code: all_rl lost problem 5 against its SFT model in each seed
    code_rl = result["last_rl_vs_sft"]["seed 1"]["code"]
    assert (code_rl["a_only"], code_rl["b_only"], code_rl["difference"]) == (0, 1, pytest.approx(-0.1))
    # the stage table carries Wilson intervals: 8 of 10 is [49.0%, 94.3%]
    assert "80.0% [49.0%, 94.3%]" in done.stdout
    assert png.stat().st_size > 0


def test_runs_pair_only_by_equal_seeds(tmp_path: Path) -> None:
    r1 = fake_run(tmp_path / "r1", 0, {"sft": {"math": [1]}})
    zero = fake_run(tmp_path / "zero", 1, {"zero_rl": {"math": [1]}})
    done = compare("--r1", r1, "--r1-zero", zero, "--png", tmp_path / "x.png")
    assert done.returncode != 0 and "run.seed=0" in done.stderr and "run.seed=1" in done.stderr


DISTILL = Path(__file__).resolve().parents[1] / "bench" / "compare_distill_runs.py"


def fake_distill(path: Path, seed: int, sft: float, rl: float, rl_tokens: int) -> Path:
    """A finished distill run's compare/comparison.json: two rows, one margin, one budget check."""
    (path / "compare").mkdir(parents=True)
    (path / "config.yaml").write_text(f"run:\n  seed: {seed}\n")
    rows = {"distilled": {"pass@1": sft, "pass@1_interval": [sft - 0.05, sft + 0.05]},
            "rl": {"pass@1": rl, "pass@1_interval": [rl - 0.05, rl + 0.05]}}
    margin = {"a": "distilled", "b": "rl", "n": 100, "difference": sft - rl, "low": sft - rl - 0.1, "high": sft - rl + 0.1,
              "a_only": 10, "b_only": 2, "p_value": 0.04}
    budget = {"rl": "rl", "sft": "distilled", "rl_optimizer_steps": 300, "sft_optimizer_steps": 300,
              "rl_tokens": rl_tokens, "sft_tokens": 1000, "holds": rl_tokens >= 1000}
    (path / "compare" / "comparison.json").write_text(json.dumps({"rows": rows, "margins": [margin], "budgets": [budget]}))
    return path


def test_distill_seeds_table_comes_from_the_comparisons(tmp_path: Path) -> None:
    runs = [fake_distill(tmp_path / "s0", 0, 0.80, 0.40, 1500), fake_distill(tmp_path / "s1", 1, 0.90, 0.30, 900)]
    done = subprocess.run([sys.executable, str(DISTILL), *map(str, runs), "--png", str(tmp_path / "d.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seeds"] == [0, 1] and result["mean_pass@1"] == pytest.approx({"distilled": 0.85, "rl": 0.35})
    assert "| distilled - rl | +40.0 [+30.0, +50.0], p = 0.04 | +60.0 [+50.0, +70.0], p = 0.04 | **+50.0** |" in done.stdout
    assert "tokens 1,500 vs 1,000 (holds)" in done.stdout and "tokens 900 vs 1,000 (DOES NOT HOLD)" in done.stdout
    assert (tmp_path / "d.png").stat().st_size > 0
