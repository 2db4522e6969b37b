"""The main command end to end on the seconds-long tiny recipe: `r1pipe run r1-zero-tiny`
pre-trains a base, runs GRPO on Ray, evaluates, and leaves the run directory people read; its
stages hand their models on, and every generation goes one way (the same figures, the same texts)."""
import json
import subprocess
import sys
from pathlib import Path

from r1pipe.config import load_recipe
from r1pipe.data.jsonl import read_jsonl
from r1pipe.run import run_recipe
from r1pipe.stages.base_eval import measure_accuracy


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_r1_zero_tiny_end_to_end_then_rerun_skips(tmp_path: Path, capsys) -> None:
    first = run_cli("run", "r1-zero-tiny", "--run-dir", "rd", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rd = tmp_path / "rd"
    for stage in ("pretrain", "rl", "eval"):
        assert (rd / stage / "DONE.json").is_file(), stage
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["base_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["eval"]["heldout"]["n_problems"] == 8
    # one evaluation path: pretrain's greedy base check and GRPO's base accuracy (same 8 problems, same
    # budget) are the same figure, and the summary's base and final accuracy both come from GRPO's
    pretrain = json.loads((rd / "pretrain" / "DONE.json").read_text())
    assert pretrain["base_accuracy_greedy"] == summary["base_accuracy"]
    rl = json.loads((rd / "rl" / "DONE.json").read_text())
    assert (rl["base_accuracy"], rl["final_accuracy"]) == (summary["base_accuracy"], summary["final_accuracy"])
    assert summary["wall_seconds"] > 0
    metrics = [json.loads(line) for line in (rd / "rl" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in trained] == [1, 2]
    for key in ("accuracy", "response_length/mean", "entropy", "grad_norm", "time/rollout", "time/train"):
        assert key in trained[-1], key
    assert (rd / "rl" / "plots" / "reward.png").stat().st_size > 1000
    assert (rd / "eval" / "report.json").is_file() and (rd / "eval" / "generations.jsonl").is_file()
    # with output not on a terminal (as here), pre-training and generation print plain progress lines
    printed = first.stdout.splitlines()
    assert any(line.startswith("pretrain: step 1/20 (5%)  loss=") and "elapsed" in line for line in printed), printed
    assert any(line.startswith("pretrain: step 20/20 (100%)  loss=") for line in printed)
    assert any(line.startswith("generate: prompt 8/8 (100%)") for line in printed)

    # the eval stage scores the model the rl stage wrote, on the held-out problems, and its greedy completions
    # are the base check's (measure_accuracy) on that model: both go through a generation group
    evaluated = json.loads((rd / "eval" / "DONE.json").read_text())
    assert evaluated["model_path"] == rl["model_path"]
    assert evaluated["suites"]["heldout"]["skipped_rows"] == 0
    generations = read_jsonl(rd / "eval" / "generations.jsonl")
    rows = read_jsonl(tmp_path / pretrain["heldout_path"])[:8]  # the outputs' paths are the command's, relative to its cwd
    mine = measure_accuracy(tmp_path / rl["model_path"], rows, 0.0, load_recipe("r1-zero-tiny").eval.max_tokens)
    cut = lambda text: text.split("</answer>")[0]  # the engine stops at </answer>
    assert [cut(g["response"]) for g in generations] == [cut(s["completion"]) for s in mine.samples]

    # the same recipe again (here, not in a subprocess: what is left to test is the run's own skipping)
    capsys.readouterr()
    run_recipe(load_recipe("r1-zero-tiny"), rd)
    assert capsys.readouterr().out.count("done earlier, skipped") == 3


def test_misspelt_key_is_named_before_anything_runs(tmp_path: Path) -> None:
    bad = run_cli("run", "r1-zero-tiny", "rl.group_sise=4", "--run-dir", "rd", cwd=tmp_path)
    assert bad.returncode == 2
    assert "group_sise" in bad.stdout + bad.stderr
    assert not (tmp_path / "rd").exists()


def test_readme_bring_your_own_command(tmp_path: Path) -> None:
    """README: `r1pipe run r1-zero "stages=[rl,eval]" model.path=... rl.data.train_path=... rl.data.heldout_path=...`
    (plus overrides that shrink it to seconds): RL, then eval on the held-out problems grpo hands on."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_grpo_run import make_tiny_model, write_problems

    model = make_tiny_model(tmp_path / "ckpt")
    train, heldout = write_problems(tmp_path / "p.jsonl", 16), write_problems(tmp_path / "h.jsonl", 4)
    small = ["rl.steps=1", "rl.rollout.prompts_per_step=2", "rl.rollout.group_size=2", "rl.rollout.max_tokens=8",
             "rl.data.heldout_size=4", "rl.data.eval_every=0", "rl.rollout.dynamic_sampling=false", "eval.max_tokens=8",
             "cluster.num_cpus=2", "rl.resources.trainer.workers=1", "rl.resources.rollout.workers=1"]
    done = run_cli("run", "r1-zero", "stages=[rl,eval]", f"model.path={model}", f"rl.data.train_path={train}",
                   f"rl.data.heldout_path={heldout}", *small, "--run-dir", "rd", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "rd" / "summary.json").read_text())
    assert summary["eval"]["heldout"]["n_problems"] == 4 and summary["steps"] == 1


def test_bad_model_path_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    bad = run_cli("run", "r1-zero", "stages=[rl,eval]", "model.path=/no/such/ckpt", "rl.data.train_path=p.jsonl",
                  "rl.data.heldout_path=h.jsonl", "--run-dir", "rd", cwd=tmp_path)
    assert bad.returncode == 2
    lines = [l for l in (bad.stdout + bad.stderr).splitlines() if l.strip()]
    assert lines == ["r1pipe run: model.path=/no/such/ckpt: no such directory"], lines
    assert not (tmp_path / "rd").exists()


def test_options_and_overrides_in_any_order(tmp_path: Path) -> None:
    for args in (("--dry-run", "r1-zero", "rl.rollout.group_size=4"), ("r1-zero", "--dry-run", "rl.rollout.group_size=4"),
                 ("r1-zero", "rl.rollout.group_size=4", "--dry-run")):
        out = run_cli("run", *args, cwd=tmp_path)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        assert "group_size: 4" in out.stdout, args
    assert not (tmp_path / "runs").exists()
