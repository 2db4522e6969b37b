"""The main command end to end on the seconds-long tiny recipe: `r1pipe run r1-zero-tiny`
pre-trains a base, runs GRPO on Ray, evaluates, and leaves the run directory people read."""
import json
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_r1_zero_tiny_end_to_end_then_rerun_skips(tmp_path: Path) -> None:
    first = run_cli("run", "r1-zero-tiny", "--run-dir", "rd", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rd = tmp_path / "rd"
    for stage in ("pretrain", "rl", "eval"):
        assert (rd / stage / "DONE.json").is_file(), stage
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["base_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["eval"]["heldout"]["n_problems"] == 8
    assert summary["wall_seconds"] > 0
    metrics = [json.loads(line) for line in (rd / "rl" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in trained] == [1, 2]
    for key in ("accuracy", "response_length/mean", "entropy", "grad_norm", "time/rollout", "time/train"):
        assert key in trained[-1], key
    assert (rd / "rl" / "plots" / "reward.png").stat().st_size > 1000
    assert (rd / "eval" / "report.json").is_file() and (rd / "eval" / "generations.jsonl").is_file()

    again = run_cli("run", "r1-zero-tiny", "--run-dir", "rd", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == 3


def test_misspelt_key_is_named_before_anything_runs(tmp_path: Path) -> None:
    bad = run_cli("run", "r1-zero-tiny", "rl.group_sise=4", "--run-dir", "rd", cwd=tmp_path)
    assert bad.returncode == 2
    assert "group_sise" in bad.stdout + bad.stderr
    assert not (tmp_path / "rd").exists()
