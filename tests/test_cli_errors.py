"""Bad input through the `r1pipe` command, as a user meets it: every case runs as a subprocess and must
end with the exit status of a user error (2), a last stderr line that names the problem, no traceback,
and no Ray process of its own left behind (each run gets its own RAY_TMPDIR, which every Ray process
it starts carries on its command line). Also: Ctrl-C and SIGTERM during a run, an unreachable or
silent cluster address, saved responses with malformed lines, and how errors raised inside Ray
actors are unwrapped."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from r1pipe.data.jsonl import write_jsonl
from r1pipe.errors import ConfigError, Explained, explain
from tiny_models import make_tiny_v3

PROBLEMS = [{"id": i, "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return build_files(tmp_path_factory.mktemp("cli_errors"))


def build_files(root: Path) -> dict[str, Path]:
    """A tiny model, broken copies of it, and data files good and bad."""
    model = make_tiny_v3(root / "model")
    corrupt = root / "corrupt"
    shutil.copytree(model, corrupt)
    weights = next(corrupt.glob("*.safetensors"))
    os.truncate(weights, weights.stat().st_size * 9 // 10)  # a copy cut short
    make_tiny_v3(root / "no_mtp", num_nextn_predict_layers=0)
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(model, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    write_jsonl(root / "problems.jsonl", PROBLEMS)
    write_jsonl(root / "one.jsonl", PROBLEMS[:1])
    (root / "empty.jsonl").write_text("")
    (root / "garbage.jsonl").write_text("this is not JSON\nnor is this\n")
    (root / "empty.yaml").write_text("")
    gpt2 = root / "gpt2"  # whole files, but an architecture the engine does not run
    shutil.copytree(model, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()), "model_type": "gpt2"}))
    return {"root": root, "model": model, "corrupt": corrupt, "no_tokenizer": no_tokenizer, "no_mtp": root / "no_mtp"}


def ray_dir() -> Path:
    """A short, unique RAY_TMPDIR (Ray's socket paths must stay under ~100 characters)."""
    path = Path("/tmp") / f"r1e-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def ray_processes(tag: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(tag)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def assert_no_ray_left(tag: Path, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    while ray_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes(tag) == []
    shutil.rmtree(tag, ignore_errors=True)


def r1pipe(args: list[str], cwd: Path, tag: Path, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_TMPDIR=str(tag), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def tiny_rl(files: dict[str, Path], *overrides: str) -> list[str]:
    """GRPO alone on the tiny model and problems: the overrides pick what is wrong."""
    return ["run", "r1-zero-tiny", "stages=[rl]", f"model.path={files['model']}", f"rl.data.train_path={files['root']}/problems.jsonl",
            f"rl.data.heldout_path={files['root']}/problems.jsonl", "rl.data.heldout_size=2", *overrides]


# (id, arguments (built from the fixture's files), what the last stderr line must contain)
CASES = [
    # the recipe, caught at load time (`--dry-run` too)
    ("empty recipe", lambda f: ["run", str(f["root"] / "empty.yaml")], "the recipe is empty"),
    ("lr zero", lambda f: ["run", "r1-zero", "rl.optim.lr=0"], "rl.optim.lr must be a number > 0, got 0.0"),
    ("lr nan", lambda f: ["run", "r1-zero", "rl.optim.lr=nan", "--dry-run"], "rl.optim.lr must be a number > 0, got nan"),
    ("pretrain lr", lambda f: ["run", "r1-zero", "pretrain.optim.lr=-0.001"], "pretrain.optim.lr must be a number > 0"),
    ("sft lr nan", lambda f: ["run", "r1", "sft.optim.lr=nan", "--dry-run"], "sft.optim.lr must be a number > 0, got nan"),
    ("moved key", lambda f: ["run", "r1-zero", "rl.lr=1e-5", "--dry-run"], "rl.lr: moved to rl.optim.lr"),
    ("moved key in a tiny recipe", lambda f: ["run", "r1", "reasoning_rl.num_policy_workers=4", "--dry-run"],
     "reasoning_rl.num_policy_workers: moved to reasoning_rl.resources.trainer.workers"),
    ("negative temperature", lambda f: ["run", "r1-zero", "rl.rollout.temperature=-1"], "rl.rollout.temperature must be > 0"),
    ("eval temperature", lambda f: ["run", "r1-zero", "eval.temperature=-0.5", "--dry-run"], "eval.temperature must be >= 0"),
    ("float8", lambda f: ["run", "r1-zero", "model.dtype=float8"], "model.dtype: unknown dtype 'float8'"),
    ("engine float8", lambda f: ["run", "r1-zero", "rl.rollout.engine.dtype=float8", "--dry-run"],
     "rl.rollout.engine.dtype: unknown dtype 'float8'"),
    ("heldout_size 0", lambda f: ["run", "r1-zero", "rl.data.heldout_size=0"], "rl.data.heldout_size must be >= 1"),
    ("ref to a later stage", lambda f: ["run", "r1-zero", "rl.data.train_path=stage:eval.report_path"],
     "rl.data.train_path='stage:eval.report_path': stage 'eval' runs after 'rl'"),
    ("ref to no stage", lambda f: ["run", "r1-zero", "rl.model_path=stage:sft.model_path", "--dry-run"],
     "rl.model_path='stage:sft.model_path': the recipe has no stage 'sft'"),
    # paths and the cluster, checked before any stage runs
    ("unreachable cluster", lambda f: ["run", "r1-zero", "cluster.address=127.0.0.1:1"],
     "cluster.address=127.0.0.1:1: no Ray cluster answers there"),
    ("corrupt weights", lambda f: ["run", "r1-zero", f"model.path={f['corrupt']}", "stages=[rl]"], "is corrupt or truncated"),
    ("no tokenizer", lambda f: ["run", "r1-zero", f"model.path={f['no_tokenizer']}", "stages=[rl]"], "no tokenizer files there"),
    ("model init: missing --tokenizer", lambda f: ["model", "init", "tiny-qwen2", "--tokenizer", str(f["root"] / "nothing"),
                                                   "--out", str(f["root"] / "out")], "--tokenizer="),
    ("eval: unsupported model", lambda f: ["eval", "--model", str(f["root"] / "gpt2"), "--suite", "gsm8k", "--out",
                                           str(f["root"] / "eval_gpt2")],
     "model_type 'gpt2' is not supported by r1pipe's engine; supported model types: deepseek_v3, llama, qwen2"),
    ("grpo: unsupported model", lambda f: ["run", "r1-zero", f"model.path={f['root'] / 'gpt2'}", "stages=[rl]"],
     "model_type 'gpt2' is not supported by r1pipe's engine; supported model types: deepseek_v3, llama, qwen2"),
    ("eval: empty responses", lambda f: ["eval", "--suite", "gsm8k", "--responses", str(f["root"] / "empty.jsonl"),
                                         "--out", str(f["root"] / "eval_out")], "no responses: the file is empty"),
    ("ep_size without fsdp", lambda f: ["run", "r1-zero", "rl.parallelism.ep_size=2", "--dry-run"],
     "rl.parallelism.ep_size=2 needs fsdp: true"),
    ("ep_size and the experts", lambda f: tiny_rl(f, "rl.parallelism={fsdp: true, ep_size: 3}", "rl.resources.trainer.workers=3"),
     "rl.parallelism.ep_size=3 does not divide the model's 16 routed experts per layer"),
    ("ep_size and the workers", lambda f: tiny_rl(f, "rl.parallelism={fsdp: true, ep_size: 4}", "rl.resources.trainer.workers=2"),
     "rl.parallelism.ep_size=4: the 2 workers must be a multiple of it"),
    # data, read by the stage on the driver before Ray starts
    ("empty data file", lambda f: tiny_rl(f, f"rl.data.train_path={f['root']}/empty.jsonl"), "empty.jsonl: no rows (the file is empty)"),
    ("non-JSON data file", lambda f: tiny_rl(f, f"rl.data.train_path={f['root']}/garbage.jsonl"), "2 not JSON (line 1"),
    # the cluster is too small for the workers asked for (Ray starts, then the stage stops)
    ("resource shortfall", lambda f: tiny_rl(f, "rl.resources.trainer.workers=8", "cluster.num_cpus=2"),
     "CPU: asked 5.5 = policy 8 x 0.5 + rollout 1 x 0.5 + reward 1 x 1; available 2"),
]


@dataclass
class Outcome:
    out: subprocess.CompletedProcess
    seconds: float
    ray_left: list[str]


def run_case(case: tuple, files: dict[str, Path], cwd: Path) -> Outcome:
    tag = ray_dir()
    t0 = time.monotonic()
    out = r1pipe(case[1](files), cwd, tag, timeout=100)
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 20
    while ray_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ray_processes(tag)
    shutil.rmtree(tag, ignore_errors=True)
    return Outcome(out, seconds, left)


@pytest.fixture(scope="module")
def outcomes(files, tmp_path_factory) -> dict[str, Outcome]:
    """Every case of the table, run as subprocesses four at a time (most of their time is imports and
    Ray's start-up), each in its own working directory."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case[0]: pool.submit(run_case, case, files, tmp_path_factory.mktemp("case")) for case in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback_no_ray_left(case, outcomes):
    outcome = outcomes[case[0]]
    err = outcome.out.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert outcome.out.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    assert lines and case[2] in lines[-1], lines[-3:]
    ours = [line for line in lines if line.startswith("r1pipe ")]
    assert 1 <= len(ours) <= 2, ours
    assert outcome.ray_left == []
    assert outcome.seconds < 90


def test_a_full_disk_is_one_line_exit_2_before_training(files, tmp_path, small_disk):
    """The run directory on a 2 MB file system: the GRPO stage checks room for its checkpoints before it trains
    and stops with the one line, leaving no partial checkpoint and no Ray process."""
    disk, tag = small_disk(2), ray_dir()
    out = r1pipe(tiny_rl(files, "--run-dir", str(disk / "run")), tmp_path, tag, timeout=100)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert lines and lines[-1].startswith("r1pipe run: no space left on ") and "need" in lines[-1], lines[-3:]
    assert not list((disk / "run").rglob("step_*")) and not list((disk / "run").rglob(".tmp_*"))
    assert_no_ray_left(tag)


def test_a_stage_reference_error_leaves_no_stage_directory(tmp_path):
    """The reference is refused at load time: nothing of the run exists afterwards."""
    out = r1pipe(["run", "r1-zero", "rl.data.train_path=stage:eval.report_path"], tmp_path, ray_dir(), timeout=60)
    assert out.returncode == 2 and not (tmp_path / "runs").exists()


def test_debug_prints_the_traceback(files, tmp_path):
    out = r1pipe(["run", "r1-zero", f"model.path={files['corrupt']}", "--debug"], tmp_path, ray_dir(), timeout=60)
    assert out.returncode == 2 and "Traceback" in out.stderr and "corrupt or truncated" in out.stderr.splitlines()[-1]


def test_ctrl_c_during_grpo_stops_the_run_and_ray(files, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the GRPO workers run:
    exit 130 with one line, no traceback, no Ray process left. The one-problem training file is
    said to repeat, not repeated silently."""
    tag = ray_dir()
    env = dict(os.environ, RAY_TMPDIR=str(tag), PYTHONUNBUFFERED="1")
    args = tiny_rl(files, f"rl.data.train_path={files['root']}/one.jsonl", "rl.steps=1000")
    proc = subprocess.Popen([sys.executable, "-m", "r1pipe.cli", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any("raylet" in line for line in ray_processes(tag)) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        time.sleep(3)  # the workers are being started
        os.killpg(proc.pid, signal.SIGINT)
        t_signal = time.monotonic()
        out, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted (Ctrl-C)" in lines[-1]
    assert stopped_in < 30
    assert any("1 usable training problem for rl.rollout.prompts_per_step=4: every step repeats each problem about 4.0x" in line
               for line in lines)
    assert_no_ray_left(tag)


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections but never speaks Ray."""
    import socket

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def test_joining_a_cluster_that_does_not_answer_ends_promptly(silent_port):
    """Where a stage joins Ray (r1pipe.workers.cluster.ray_init): a refused port is one ClusterError at
    once; a port that accepts TCP but never speaks Ray (Ray's client then blocks the main thread and
    retries for ever) ends with one line after the join timeout (exit 2), and at once on SIGTERM (143)."""
    code = ("import sys\nimport argparse\nfrom r1pipe.cli import run_command\nfrom r1pipe.errors import ClusterError\n"
            "from r1pipe.workers.cluster import ray_init\n"
            "try:\n    ray_init({'cluster': {'address': '127.0.0.1:1'}})\nexcept ClusterError as e:\n    print(e, flush=True)\n"
            "print('joining', flush=True)\n"
            f"sys.exit(run_command('r1pipe run', lambda a: ray_init({{'cluster': {{'address': '127.0.0.1:{silent_port}'}}}}, "
            "join_timeout_s=float(sys.argv[1])), argparse.Namespace(debug=False)))\n")
    tag = ray_dir()
    env = dict(os.environ, RAY_TMPDIR=str(tag))
    waiting, timing_out = (subprocess.Popen([sys.executable, "-c", code, timeout], env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True) for timeout in ("300", "3"))
    refused = waiting.stdout.readline()
    assert refused.startswith("cluster.address=127.0.0.1:1: no Ray cluster answers there (connection refused)")
    assert waiting.stdout.readline() == "joining\n"
    time.sleep(3)  # inside ray.init
    assert waiting.poll() is None
    waiting.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = waiting.communicate(timeout=30)
    assert time.monotonic() - t0 < 5 and waiting.returncode == 143, err[-2000:]
    assert f"SIGTERM while joining the Ray cluster at cluster.address=127.0.0.1:{silent_port}" in err.splitlines()[-1]
    _, err = timing_out.communicate(timeout=90)
    assert timing_out.returncode == 2, err[-2000:]
    assert f"cluster.address=127.0.0.1:{silent_port}: the Ray cluster did not accept this driver within 3s" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert_no_ray_left(tag)


def test_the_drafter_without_an_mtp_module_is_refused_on_the_driver(files, tmp_path):
    """The policy workers would find out in their constructors (an actor's death, after Ray started)."""
    from r1pipe.config import load_recipe, stage_config
    from r1pipe.stages import StageContext
    from r1pipe.stages.grpo import GRPOTrainer

    recipe = load_recipe("r1-zero-tiny", [f"model.path={files['no_mtp']}", "rl.algorithm.draft_loss=true"])
    trainer = GRPOTrainer(stage_config(recipe, "rl"), StageContext(tmp_path, tmp_path / "rl", recipe, 0))
    trainer.base_model = str(files["no_mtp"])
    with pytest.raises(ConfigError, match=r"rl.algorithm.draft_loss needs a model with an MTP module; .*no_mtp has none"):
        trainer._check_model()
    trainer.base_model = str(files["model"])
    trainer._check_model()


def test_malformed_saved_responses_are_counted_on_the_console(tmp_path):
    rows = [json.dumps({"id": 0, "response": "The answer is \\boxed{18}."}), "", "not json", json.dumps({"id": 1})]
    (tmp_path / "r.jsonl").write_text("\n".join(rows) + "\n")
    out = r1pipe(["eval", "--suite", "gsm8k", "--responses", "r.jsonl", "--out", "eval_out", "--quiet", "--workers", "1"],
                 tmp_path, ray_dir(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "skipped 3 malformed rows (kept 1, skipped 3: 1 blank line (line 2), 1 not JSON (line 3: Expecting value), " \
           "1 no 'id' and string 'response' (line 4))" in out.stderr
    report = json.loads((tmp_path / "eval_out" / "report.json").read_text())
    assert report["malformed_response_rows"] == 3 and report["suites"]["gsm8k"]["n_problems"] == 1


# ---------------------------------------------------------------- errors from inside Ray actors


def _raised(exc: Exception) -> tuple[Exception, str]:
    try:
        raise exc
    except Exception as e:
        return e, traceback.format_exc()


def test_errors_from_ray_actors_are_unwrapped_to_their_cause():
    from ray.exceptions import ActorDiedError, RayTaskError

    cause, tb = _raised(ConfigError("rl.algorithm.draft_loss needs a model with an MTP module"))
    task_error = RayTaskError("PolicyWorker.train_step", tb, cause, proctitle="ray::PolicyWorker", pid=1, ip="127.0.0.1")
    # what ray.get raises: a class that is both RayTaskError and the cause's class, its text the remote traceback
    dual = task_error.as_instanceof_cause()
    assert isinstance(dual, RayTaskError) and isinstance(dual, ConfigError) and "File " in str(dual)
    assert explain(dual, "r1pipe run") == Explained(("r1pipe run: rl.algorithm.draft_loss needs a model with an MTP module",), 2)
    # an actor whose constructor raised: Ray keeps only the text of the cause's traceback
    died = ActorDiedError(task_error)
    assert explain(died, "r1pipe run") == Explained(("r1pipe run: rl.algorithm.draft_loss needs a model with an MTP module",), 2)
    # a bug inside an actor is one line naming it (exit 1), the traceback only with --debug
    bug, tb = _raised(ZeroDivisionError("division by zero"))
    died = ActorDiedError(RayTaskError("RolloutWorker.__init__", tb, bug, proctitle="ray::RolloutWorker", pid=1, ip="127.0.0.1"))
    assert explain(died, "r1pipe run").lines[0] == "r1pipe run: error in a Ray worker: ZeroDivisionError: division by zero"
    assert explain(died, "r1pipe run").status == 1


def test_explain_covers_interrupts_full_disks_and_bugs():
    assert explain(KeyboardInterrupt(), "r1pipe run").status == 130
    full = OSError(28, "No space left on device", "/runs/x/rl/checkpoints/step_000010")
    assert explain(full, "r1pipe run") == Explained(
        ("r1pipe run: no space left on the device of /runs/x/rl/checkpoints/step_000010",), 2)
    bug = explain(KeyError("x"), "r1pipe run")
    assert bug.status == 1 and bug.lines == ("r1pipe run: unexpected error: KeyError: 'x'", "r1pipe run:   rerun with --debug for the traceback")
