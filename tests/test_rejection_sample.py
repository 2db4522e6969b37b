"""`kind: rejection_sample` on a small pre-trained base of the R1 world: every kept sample passes
its grader (accuracy for math rows, tests in the sandbox for code rows) and every named filter,
exactly the rows whose answers are known to be right are kept, and a build killed mid-way
regenerates no finished shard."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from r1pipe.config import load_recipe
from r1pipe.data.jsonl import read_jsonl, write_jsonl
from r1pipe.rewards import build_reward_fn, extract_answer
from r1pipe.rewards.readability import build_filters

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32}
PRETRAIN = {"kind": "pretrain", "world": "r1", "problem_kinds": ["add"], "worked_fraction": 1.0, "tutor_fraction": 0.0,
            "mix_fraction": 0.3, "code_fraction": 0.3, "code_train_size": 16, "code_heldout_size": 8, "max_digits": 2,
            "train_size": 32, "heldout_size": 16, "vocab_size": 400, "tokenizer_examples": 2000, "steps": 150,
            "batch_size": 16, "lr": 1.0e-2, "warmup_steps": 10, "eval_size": 0, "cache_dir": None}
FILTERS = {"language_consistency": {"min_share": 0.99}, "no_mixed_scripts": {}, "length": {"min_chars": 10},
           "no_repeated_paragraphs": {"split": " ; "}, "no_code_in_math": {}}
WEIGHTS = {"accuracy": 1.0, "code": 1.0, "format": 0.1, "language": 0.1}


def write_recipe(path: Path, stages: list[str], **sections) -> Path:
    recipe = {"run": {"name": "t", "out_dir": str(path.parent), "seed": 0}, "cluster": {"num_cpus": 2},
              "model": {"preset": "tiny", "overrides": TINY, "path": sections.pop("model_path", None)},
              "stages": stages, **sections}
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A base that writes well-formed R1-world answers (right or wrong): 150 pre-training steps."""
    from r1pipe.run import run_recipe

    root = tmp_path_factory.mktemp("base")
    recipe = write_recipe(root / "base.yaml", ["pretrain"], pretrain=PRETRAIN)
    return run_recipe(load_recipe(recipe), root / "run")["pretrain"]


def known_prompts(base: dict, path: Path, n: int = 12) -> tuple[Path, list[bool], list[str]]:
    """The first n mixed-domain rows, with gold answers (math) or tests (code) set to what the
    base answers greedily on every other row, so those rows are known to be graded right, and the
    rest known to be wrong. Returns the file and, per row, whether the greedy answer is right and its text."""
    from r1pipe.engine import LLM, SamplingParams

    rows = read_jsonl(base["mixed_train_path"])[:n]
    llm = LLM(str(Path(base["model_path"])), seed=0)
    outs = llm.generate([r["prompt"] for r in rows], SamplingParams(n=1, temperature=0.0, max_tokens=40, stop=["</answer>"]),
                        use_tqdm=False)
    right, texts = [], []
    for i, (row, out) in enumerate(zip(rows, outs)):
        c = out.outputs[0]
        text = c.text + (c.stop_reason if isinstance(c.stop_reason, str) else "")  # as the rewards see it
        make_right = i % 2 == 0
        texts.append(text)
        if row["domain"] == "math":
            pred = extract_answer(text)
            row["answer"] = pred if make_right and pred else "-424242"
            right.append(bool(make_right and pred))
        else:
            m = re.search(r"return x \+ (\d+)", text)
            c = int(m.group(1)) if (m and make_right) else 10**6
            row["test_list"] = [f"assert f({x}) == {x + c}" for x in (0, 5)]
            right.append(bool(m and make_right))
    write_jsonl(path, rows)
    return path, right, texts


def rs_section(prompts: Path, **over) -> dict:
    return {"kind": "rejection_sample", "prompts_path": str(prompts), "k": 3, "temperature": 0.0, "max_tokens": 40,
            "max_per_prompt": 2, "shard_size": 4, "filters": FILTERS, "reward_weights": WEIGHTS, **over}


def test_kept_samples_pass_the_grader_and_every_filter(base, tmp_path) -> None:
    from r1pipe.run import run_recipe

    prompts, right, texts = known_prompts(base, tmp_path / "known.jsonl")
    recipe = write_recipe(tmp_path / "rs.yaml", ["rs"], model_path=base["model_path"], rs=rs_section(prompts))
    out = run_recipe(load_recipe(recipe), tmp_path / "run")["rs"]

    rows = {r["id"]: r for r in read_jsonl(prompts)}
    kept = read_jsonl(out["jsonl_path"])
    reward_fn = build_reward_fn(WEIGHTS)
    filters = build_filters(FILTERS)
    for sample in kept:  # re-scored here, independently of the stage
        ref = rows[sample["prompt_id"]]
        grader = "accuracy" if ref["domain"] == "math" else "code"
        assert reward_fn(sample["response"], ref).components[grader] == 1.0, sample
        assert all(f(sample["response"], ref) for f in filters), sample
        assert sorted(sample["filters_passed"]) == sorted(FILTERS)
        assert sample["source_checkpoint"] == base["model_path"]
        assert sample["sampling"]["temperature"] == 0.0 and sample["sampling"]["k"] == 3
        assert sample["rewards"][grader] == 1.0 and set(sample["rewards"]) == set(WEIGHTS)
    # greedy: the k samples of a prompt are one text, kept once (the other two are duplicates);
    # kept are exactly the rows known to be right whose greedy text passes every filter
    expected = {i for i, ok, text in zip(rows, right, texts) if ok and all(f(text, rows[i]) for f in filters)}
    assert {s["prompt_id"] for s in kept} == expected and len(kept) == len(expected)
    assert expected, "the base answered nothing in the R1 format"
    stats = json.loads(Path(out["stats_path"]).read_text())
    assert stats["prompts"] == len(rows) and stats["generated"] == 3 * len(rows)
    assert stats["kept"] == len(kept) == out["kept"]
    assert stats["correct"] == 3 * sum(right)
    assert stats["duplicates"] == 2 * stats["kept"]
    assert set(stats["rejected_share"]) == set(FILTERS)
    assert Path(stats["length_histogram_png"]).stat().st_size > 1000
    import datasets

    ds = datasets.load_from_disk(out["sft_path"])
    assert len(ds) == len(kept) and {"prompt", "response", "rewards", "filters_passed", "source_checkpoint"} <= set(ds.column_names)


def test_killed_build_regenerates_no_finished_shard(base, tmp_path) -> None:
    prompts = Path(base["mixed_train_path"])
    section = rs_section(prompts, temperature=1.0, k=2, limit=24, filters={})
    recipe = write_recipe(tmp_path / "rs.yaml", ["rs"], model_path=base["model_path"], rs=section)
    proc = subprocess.Popen([sys.executable, "-m", "r1pipe.cli", "run", str(recipe), "--run-dir", "killed"], cwd=tmp_path,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = tmp_path / "killed" / "rs" / "shards"
    deadline = time.time() + 300
    while not (shards / "shard-00001.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in shards.glob("shard-*.jsonl")}
    assert 2 <= len(finished) < 6, (sorted(finished), proc.stderr.read().decode()[-2000:])
    assert not (tmp_path / "killed" / "rs" / "DONE.json").exists()

    again = run_cli("run", str(recipe), "--run-dir", "killed", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"6 shards, {len(finished)} done earlier" in again.stdout
    for name, (mtime, text) in finished.items():
        assert (shards / name).stat().st_mtime_ns == mtime and (shards / name).read_text() == text
    # the resumed build equals an uninterrupted one (seeded per prompt)
    whole = run_cli("run", str(recipe), "--run-dir", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for j in range(6):
        name = f"shard-{j:05d}.jsonl"
        assert (shards / name).read_text() == (tmp_path / "whole" / "rs" / "shards" / name).read_text(), name
