"""`kind: rejection_sample` on a small pre-trained base of the R1 world: every kept sample passes
its grader (accuracy for math rows, tests in the sandbox for code rows) and every named filter,
exactly the rows whose answers are known to be right are kept, and a build killed mid-way
regenerates no finished shard."""
import json
import re
import subprocess
import sys
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
            "train_size": 32, "heldout_size": 16, "vocab_size": 400, "tokenizer_examples": 2000, "steps": 200,
            "batch_size": 16, "optim": {"lr": 1.0e-2, "warmup_steps": 10}, "eval_size": 0, "cold_start_size": 40}
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
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=2000)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A base that writes well-formed R1-world answers (right or wrong): 150 pre-training steps."""
    from r1pipe.run import run_recipe

    root = tmp_path_factory.mktemp("base")
    recipe = write_recipe(root / "base.yaml", ["pretrain"], pretrain={**PRETRAIN, "cache_dir": str(root / "cache")})
    yield {**run_recipe(load_recipe(recipe), root / "run")["pretrain"], "cache_dir": str(root / "cache")}
    import ray

    if ray.is_initialized():  # the stages run in this process started it; later modules start their own
        ray.shutdown()


def known_prompts(base: dict, path: Path, n: int = 12, max_tokens: int = 40) -> tuple[Path, list[bool], list[str]]:
    """The first n mixed-domain rows, with gold answers (math) or tests (code) set to what the
    base answers greedily (in at most `max_tokens`) on every other row, so those rows are known to be
    graded right, and the rest known to be wrong. Returns the file and, per row, whether the greedy answer is right and its text."""
    from r1pipe.engine import LLM, SamplingParams

    rows = read_jsonl(base["mixed_train_path"])[:n]
    llm = LLM(str(Path(base["model_path"])), seed=0)
    outs = llm.generate([r["prompt"] for r in rows], SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=["</answer>"]),
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


def test_killed_build_regenerates_no_finished_shard(base, tmp_path, killed_run) -> None:
    """A build SIGKILLed after its second shard, then the same command: the finished shards are kept as they
    are and the rest equal an uninterrupted build's (run here meanwhile)."""
    from r1pipe.run import run_recipe

    prompts, right, _ = known_prompts(base, tmp_path / "known.jsonl", n=24)
    # one prompt's 2 samples decode at a time, so the shards finish one after another
    section = rs_section(prompts, k=2, filters={}, engine={"max_num_seqs": 2})
    recipe = write_recipe(tmp_path / "rs.yaml", ["rs"], model_path=base["model_path"], rs=section)
    shards = tmp_path / "killed" / "rs" / "shards"
    run = killed_run([sys.executable, "-m", "r1pipe.cli", "run", str(recipe), "--run-dir", "killed"],
                     shards / "shard-00001.jsonl", cwd=tmp_path)
    run_recipe(load_recipe(recipe), tmp_path / "whole")
    err = run.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in shards.glob("shard-*.jsonl")}
    assert 2 <= len(finished) < 6, (sorted(finished), err)
    assert not (tmp_path / "killed" / "rs" / "DONE.json").exists()

    again = run_cli("run", str(recipe), "--run-dir", "killed", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"6 shards, {len(finished)} done earlier" in again.stdout
    for name, (mtime, text) in finished.items():
        assert (shards / name).stat().st_mtime_ns == mtime and (shards / name).read_text() == text
    # the resumed build equals the uninterrupted one (seeded per prompt)
    for j in range(6):
        name = f"shard-{j:05d}.jsonl"
        assert (shards / name).read_text() == (tmp_path / "whole" / "rs" / "shards" / name).read_text(), name


def overrides(prefix: str, section: dict) -> list[str]:
    """`section` as dot-list overrides under `prefix`, nested sections key by key."""
    out = []
    for k, v in section.items():
        if isinstance(v, dict):
            out += overrides(f"{prefix}.{k}", v)
        elif k != "kind":
            out.append(f"{prefix}.{k}={json.dumps(v) if isinstance(v, list) else ('null' if v is None else v)}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_r1_recipe_end_to_end_then_rerun_skips(base, tmp_path) -> None:
    """`r1pipe run r1` (the tiny recipe) with seconds-long settings: every stage runs, the summary
    has each stage's per-domain accuracy and readability, and a re-run skips them all. Rejection
    sampling reads the base (`stage:pretrain.model_path`) at T=0 on prompts whose answers are the
    base's own, so it keeps samples whatever a few RL steps did."""
    prompts, right, _ = known_prompts(base, tmp_path / "known.jsonl")
    args = [
        *overrides("model.overrides", TINY), *overrides("pretrain", {**PRETRAIN, "cache_dir": base["cache_dir"]}),
        "cluster.num_cpus=2", "cold_start.epochs=1",
        "reasoning_rl.steps=2", "reasoning_rl.rollout.prompts_per_step=4", "reasoning_rl.rollout.group_size=4",
        "reasoning_rl.data.heldout_size=4", "reasoning_rl.rollout.max_tokens=40",
        f"rejection_sample.prompts_path={prompts}", "rejection_sample.model_path=stage:pretrain.model_path",
        "rejection_sample.limit=0", "rejection_sample.temperature=0.0", "rejection_sample.k=2",
        "rejection_sample.max_tokens=40", "rejection_sample.shard_size=6", "rejection_sample.filters={}",
        "sft.epochs=1", "all_rl.steps=2", "all_rl.rollout.prompts_per_step=4", "all_rl.rollout.group_size=4",
        "all_rl.data.heldout_size=4", "all_rl.rollout.max_tokens=40", "scorecard.per_domain=4", "scorecard.max_tokens=40",
    ]
    first = run_cli("run", "r1", *args, "--run-dir", "rd", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    assert "reusing the cached base" in first.stdout
    rd = tmp_path / "rd"
    stages = ["pretrain", "cold_start", "reasoning_rl", "rejection_sample", "sft", "all_rl", "scorecard"]
    for stage in stages:
        assert (rd / stage / "DONE.json").is_file(), stage
    done = {s: json.loads((rd / s / "DONE.json").read_text()) for s in stages}
    assert done["cold_start"]["steps"] >= 1 and done["rejection_sample"]["kept"] >= 1
    sft_summary = json.loads((rd / "sft" / "summary.json").read_text())
    assert sft_summary["base_model"] == done["pretrain"]["model_path"]  # SFT of the base, not of the RL model
    assert sft_summary["data"]["train"]["kept"] >= 1
    summary = json.loads((rd / "summary.json").read_text())
    per_stage = summary["per_stage"]
    assert sorted(per_stage) == sorted(["pretrain", "cold_start", "reasoning_rl", "sft", "all_rl"])
    for name, row in per_stage.items():
        assert set(row["accuracy"]) == {"math", "code"} and row["n"] == {"math": 4, "code": 4}, name
        for key in ("format_compliance", "language_consistency", "mean_length", "mixed_script_share"):
            assert 0.0 <= row[key] and (key == "mean_length" or row[key] <= 1.0), (name, key)
        answers = read_jsonl(rd / "scorecard" / f"{name}.answers.jsonl")  # every answer, for paired comparisons
        assert [a["domain"] for a in answers].count("math") == 4 and len(answers) == 8, name
        assert sum(a["solved"] for a in answers if a["domain"] == "math") / 4 == row["accuracy"]["math"], name

    again = run_cli("run", "r1", *args, "--run-dir", "rd", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == len(stages)


def test_dry_run_shows_every_stage(tmp_path) -> None:
    tiny = run_cli("run", "r1", "--dry-run", cwd=tmp_path)
    assert tiny.returncode == 0, tiny.stderr
    assert "stages:\n- pretrain\n- cold_start\n- reasoning_rl\n- rejection_sample\n- sft\n- all_rl\n- scorecard" in tiny.stdout
    real = run_cli("run", "r1", "model.path=/ckpt/base", "--dry-run", cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    assert "stages:\n- cold_start\n- reasoning_rl\n- rejection_sample\n- sft\n- all_rl\n- eval" in real.stdout
    assert "model_path: /ckpt/base" in real.stdout  # the second SFT starts from the base


def test_scored_sampler_streams_scored_chunks_in_order(base) -> None:
    """Two rollout workers stream their prompts as they finish; the chunks asked for come out in
    order, each prompt with the samples the engine draws for its seed, scored by its row's grader."""
    import ray

    from r1pipe.data.rows import PromptRow
    from r1pipe.data.tokenizer import load_tokenizer
    from r1pipe.engine import LLM, SamplingParams
    from r1pipe.stages.scored_sampling import ScoredSampler
    from r1pipe.workers.generation import Sampling
    from r1pipe.stages.sections import SamplingResources, Workers
    from r1pipe.workers.cluster import ray_init

    tok = load_tokenizer(base["model_path"])
    raw = read_jsonl(base["mixed_train_path"])[:14]
    rows = [PromptRow(r["id"], r["problem"], r["prompt"], tok(r["prompt"], add_special_tokens=False).input_ids, r) for r in raw]
    sampling = Sampling(k=2, temperature=1.0, max_tokens=24, seed=3)
    ray_init({"cluster": {"num_cpus": 2}})
    two = SamplingResources(rollout=Workers(workers=2, cpus=0.5))
    sampler = ScoredSampler(base["model_path"], sampling, {"accuracy": 1.0, "code": 1.0}, resources=two)
    try:
        chunks = list(sampler.run(rows, 4, chunks=[3, 0, 2]))
    finally:
        sampler.shutdown()
    assert [c.start for c in chunks] == [0, 8, 12] and [len(c.rows) for c in chunks] == [4, 4, 2]
    llm = LLM(base["model_path"], seed=0)
    reward_fn = build_reward_fn({"accuracy": 1.0, "code": 1.0})
    for chunk in chunks:
        for i, (row, samples) in enumerate(zip(chunk.rows, chunk.samples)):
            params = SamplingParams(n=2, temperature=1.0, max_tokens=24, stop=["</answer>"], seed=sampling.prompt_seed(chunk.start + i))
            (out,) = llm.generate([row.prompt_ids], params, use_tqdm=False)
            assert [s.num_tokens for s in samples] == [len(c.token_ids) for c in out.outputs]
            for s in samples:
                assert s.total == reward_fn(s.text, row.reference).total
    assert ray.is_initialized()
