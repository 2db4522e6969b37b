"""Distillation pieces on tiny models: traces re-tokenized for a student with another tokenizer,
students with bases of their own from the pretrain stage (V3 and a dense Hugging Face model), the
teacher's choice of run, eval of a named model, and the comparison table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1pipe.causal_lm import is_v3, load_model
from r1pipe.config import ConfigError, load_recipe, make_config, stage_config
from r1pipe.data import load_sft_examples
from r1pipe.data.jsonl import write_jsonl
from r1pipe.data.templates import r1_zero_prompt
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.engine.tokenizer import TokenizerAdapter
from r1pipe.run import run_summary
from r1pipe.stages import StageContext, get_stage
from r1pipe.stages.compare import comparison_table, to_markdown
from r1pipe.stages.configs import CompareConfig, PretrainConfig
from r1pipe.stages.pretrain import base_key, stage_model_section
from r1pipe.stages.teacher import final_model
from tiny_models import make_tiny_qwen2, make_tiny_v3, write_worked_solutions


def test_traces_retokenized_for_another_tokenizer_round_trip(tmp_path: Path) -> None:
    """Traces are text: a student whose BPE differs from the teacher's encodes each trace to other
    ids, and its SFT targets decode back to exactly the trace (then its end-of-sequence)."""
    teacher = load_tokenizer(make_tiny_v3(tmp_path / "teacher", vocab_size=400))
    student = load_tokenizer(make_tiny_v3(tmp_path / "student", vocab_size=300))
    rows = [json.loads(line) for line in write_worked_solutions(tmp_path / "t.jsonl", 20).read_text().splitlines()]
    traces = [{"id": r["id"], "prompt": r["problem"], "response": r["solution"]} for r in rows]
    write_jsonl(tmp_path / "traces.jsonl", traces)
    examples, _ = load_sft_examples(str(tmp_path / "traces.jsonl"), student, template="raw", max_length=512, log=lambda _: None)
    assert len(examples) == len(traces)
    differs = 0
    for trace, ex in zip(traces, examples):
        targets = [t for t, m in zip(ex.input_ids, ex.target_mask) if m]
        assert targets[-1] == student.eos_token_id
        # the data layer joins prompt and response with one space (neither side brings its own)
        assert student.decode(targets[:-1]) == " " + trace["response"]
        differs += teacher(" " + trace["response"], add_special_tokens=False).input_ids != targets[:-1]
    assert differs > 0  # the two tokenizers really split the traces differently


def test_a_dense_student_tokenizes_as_its_trained_tokenizer_everywhere(tmp_path: Path) -> None:
    """Beside a qwen2 config.json, transformers' AutoTokenizer would swap in Qwen2Tokenizer and split
    the R1-Zero template into ~20x more tokens than the trained BPE; every loader r1pipe has (stages,
    engine, a saved checkpoint's copy) keeps the trained tokenizer.json's ids."""
    student = make_tiny_qwen2(tmp_path / "student", make_tiny_v3(tmp_path / "tok"))
    prompt = r1_zero_prompt("What is 75 - 15?")
    trained = Tokenizer.from_file(str(student / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids
    assert AutoTokenizer.from_pretrained(student)(prompt, add_special_tokens=False).input_ids != trained  # the trap
    assert load_tokenizer(student)(prompt, add_special_tokens=False).input_ids == trained
    assert TokenizerAdapter.load(student).encode(prompt) == trained
    load_tokenizer(student).save_pretrained(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy")(prompt, add_special_tokens=False).input_ids == trained


def test_stage_preset_keys_the_base_and_keeps_r1_zero_key() -> None:
    recipe_model = {"preset": "tiny", "path": None, "overrides": {}, "fp8": False, "dtype": "float32"}
    r1_zero = base_key(PretrainConfig(), stage_model_section(PretrainConfig(), recipe_model), 0)
    assert r1_zero == base_key(PretrainConfig(), recipe_model, 0)
    dense = PretrainConfig(preset="tiny-qwen2")
    small = PretrainConfig(preset="tiny", model_overrides={"num_hidden_layers": 2})
    keys = {r1_zero, base_key(dense, stage_model_section(dense, recipe_model), 0),
            base_key(small, stage_model_section(small, recipe_model), 0)}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="preset='gpt9'"):
        PretrainConfig(preset="gpt9")
    with pytest.raises(ValueError, match="model_overrides"):
        PretrainConfig(model_overrides={"hidden_size": 32})


def _pretrain(tmp_path: Path, preset: str, vocab: int, overrides: dict | None = None, eval_size: int = 2) -> dict:
    cfg = load_recipe("r1-zero-tiny", ["pretrain.cache_dir=null", f"pretrain.vocab_size={vocab}", "pretrain.steps=4",
                                        f"pretrain.eval_size={eval_size}", "pretrain.eval_max_tokens=8", "pretrain.tokenizer_examples=500",
                                        f"pretrain.preset={preset}"])
    sc = stage_config(cfg, "pretrain")
    sc.model_overrides = dict(overrides or {})
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / preset, recipe=cfg, seed=0)
    return get_stage("pretrain").fn(sc, ctx)


def test_pretrain_trains_a_dense_student_with_its_own_tokenizer(tmp_path: Path) -> None:
    dense = _pretrain(tmp_path, "tiny-qwen2", 300)
    # the V3 student without its base check (a V3 base's check is test_r1zero_tiny's)
    v3 = _pretrain(tmp_path, "tiny", 360, {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32},
                   eval_size=0)
    # the dense student loads back in transformers, the V3 one in r1pipe, each with its own vocabulary
    hf = AutoModelForCausalLM.from_pretrained(dense["model_path"])
    assert hf.config.model_type == "qwen2" and hf.config.vocab_size == dense["vocab_size"] == len(load_tokenizer(dense["model_path"]))
    assert is_v3(load_model(v3["model_path"])) and v3["vocab_size"] != dense["vocab_size"]
    # same corpus splits: the students are scored on the same held-out problems
    assert Path(dense["heldout_path"]).read_text() == Path(v3["heldout_path"]).read_text()
    assert 0.0 <= dense["base_accuracy_greedy"] <= 1.0
    # training moved the dense weights away from the seeded initialisation
    from r1pipe.causal_lm import dense_config
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(dense_config("tiny-qwen2", load_tokenizer(dense["model_path"])))
    assert not torch.equal(fresh.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def _finish(run: Path, stages: dict[str, dict | None]) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"stages": list(stages)}))
    for name, out in stages.items():
        if out is not None:
            (run / name).mkdir()
            (run / name / "DONE.json").write_text(json.dumps(out))


def test_teacher_is_the_final_model_of_the_first_finished_run(tmp_path: Path) -> None:
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    _finish(tmp_path / "r1", {"pretrain": {"model_path": str(tmp_path / "m1")}, "rl": None})  # unfinished
    _finish(tmp_path / "zero", {"pretrain": {"model_path": str(tmp_path / "m1")}, "rl": {"model_path": str(tmp_path / "m2")},
                                "eval": {"report_path": "r"}})
    assert final_model(tmp_path / "r1") is None and final_model(tmp_path / "none") is None
    assert final_model(tmp_path / "zero") == tmp_path / "m2"
    teacher = get_stage("teacher")
    cfg = teacher.config_cls(runs=[str(tmp_path / "r1"), str(tmp_path / "zero")])
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "t", recipe=OmegaConf.create({}), seed=0)
    assert teacher.fn(cfg, ctx) == {"model_path": str(tmp_path / "m2"), "teacher_source": str(tmp_path / "zero")}


def test_eval_stage_scores_the_named_model(tmp_path: Path) -> None:
    a = make_tiny_v3(tmp_path / "a")
    suite = tmp_path / "s.jsonl"
    write_jsonl(suite, [{"id": "q0", "prompt": "What is 2 + 3?", "answer": "5"}])
    spec = get_stage("eval")
    cfg = spec.config_cls(model_path=str(a), suites=[str(suite)], max_tokens=4)
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "e", recipe=OmegaConf.create({}), seed=0,
                       outputs={"other": {"model_path": str(tmp_path / "not-this-one")}})
    out = spec.fn(cfg, ctx)
    assert out["model_path"] == str(a) and out["suites"]["s"]["n_problems"] == 1


def test_eval_heldout_reads_its_heldout_path_over_the_newest_output(tmp_path: Path) -> None:
    """`heldout` is heldout_path when set (the test split), not the newest output, e.g. a grpo stage's validation set."""
    model = make_tiny_v3(tmp_path / "m")
    test, valid = tmp_path / "heldout.jsonl", tmp_path / "valid.jsonl"
    write_jsonl(test, [{"id": f"heldout-{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    write_jsonl(valid, [{"id": "valid-0", "problem": "What is 9 + 9?", "answer": "18"}])
    spec = get_stage("eval")
    outputs = {"base": {"heldout_path": str(test)}, "rl": {"model_path": str(model), "heldout_path": str(valid)}}
    for heldout_path, n in ((None, 1), (str(test), 3)):
        ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / f"e{n}", recipe=OmegaConf.create({}), seed=0, outputs=outputs)
        out = spec.fn(spec.config_cls(model_path=str(model), heldout_path=heldout_path, max_tokens=4), ctx)
        assert out["suites"]["heldout"]["n_problems"] == n


def comparison_outputs(root: Path | None = None) -> dict[str, dict]:
    """A run's outputs as the compare stage sees them: a teacher, an SFT and a GRPO stage with their budgets, and
    an eval stage of each model (report_path under `root` when given)."""
    report = (lambda name: str(root / name / "report.json")) if root else (lambda name: "x")
    return {
        "teacher": {"model_path": "T"},
        "sft": {"model_path": "S", "steps": 60, "optimizer_steps": 60, "trained_tokens": 5000, "tokens": 9000},
        "rl": {"model_path": "R", "steps": 60, "optimizer_steps": 120, "sampled_tokens": 4000, "sampled_sequences": 100},
        "eval_t": {"report_path": report("eval_t"), "model_path": "T", "suites": {"heldout": {"pass@1": 0.9, "n_problems": 256}}},
        "eval_s": {"report_path": report("eval_s"), "model_path": "S", "suites": {"heldout": {"pass@1": 0.85, "n_problems": 20}}},
        "eval_r": {"report_path": report("eval_r"), "model_path": "R", "suites": {"heldout": {"pass@1": 0.125, "n_problems": 256}}},
    }


def test_comparison_table_and_summary() -> None:
    outputs = comparison_outputs()
    cfg = CompareConfig(rows={"teacher": "eval_t", "distilled": "eval_s", "rl": "eval_r"}, reference="teacher")
    table = comparison_table(cfg, outputs)
    distilled = dict(table["distilled"])
    # Wilson 17/20: centre (0.85 + 0.09604) / 1.19208 = 0.793604, half 1.96 * sqrt(0.006375 + 0.002401) / 1.19208 = 0.154028
    assert distilled.pop("pass@1_interval") == pytest.approx([0.639577, 0.947632], abs=1e-6)
    assert distilled == {"eval_stage": "eval_s", "model_path": "S", "trained_by": "sft", "steps": 60, "optimizer_steps": 60,
                         "tokens": 5000, "pass@1": 0.85, "n_problems": 20, "points_vs_reference": -5.0}
    assert (table["rl"]["optimizer_steps"], table["rl"]["tokens"]) == (120, 4000)  # GRPO: the tokens it sampled
    assert table["rl"]["points_vs_reference"] == -77.5 and table["teacher"]["trained_by"] == "teacher"
    assert table["teacher"]["tokens"] is None and table["teacher"]["optimizer_steps"] is None
    # Wilson 32/256: 0.130544 -+ 0.040593
    assert "| rl | 12.5% [9.0, 17.1] | rl | 60 | 120 | 4,000 | -77.5 |" in to_markdown(table, "heldout", "teacher")
    with pytest.raises(ValueError, match="compare.rows.x='sft'"):
        comparison_table(CompareConfig(rows={"x": "sft"}), outputs)
    recipe = OmegaConf.create({"run": {"name": "d"}, "stages": [*outputs, "compare"]})
    summary = run_summary(recipe, {**outputs, "compare": {"comparison": table}}, {})
    assert summary["evals"]["eval_r"] == {"model_path": "R", "heldout": 0.125}
    assert summary["comparison"]["distilled"]["pass@1"] == 0.85


def test_budgets_and_margins_of_the_comparison(tmp_path: Path, capsys) -> None:
    """The RL row's budget against the SFT row's (fewer tokens: a warning), and the paired margin of the distilled
    row over the RL row on the problems both scored, by hand: per-problem scores a = 1, 1, 1, 0, 1, 0.5 (p5: two
    samples 1 and 0) and b = 0, 1, 0, 0, 0, 1; differences 1, 0, 1, 0, 1, -0.5: mean 5/12, sample sd 0.664580,
    half-width 1.96 * 0.664580 / sqrt(6) = 0.531775; a higher on 3 problems, b on 1: p = 2 * (1 + 4) / 16."""
    outputs = comparison_outputs(tmp_path)
    for stage, rows in {
        "eval_s": [("p0", 1), ("p1", 1), ("p2", 1), ("p3", 0), ("p4", 1), ("p5", 1), ("p5", 0), ("p6", 1)],  # p6: not in eval_r
        "eval_r": [("p0", 0), ("p1", 1), ("p2", 0), ("p3", 0), ("p4", 0), ("p5", 1)],
    }.items():
        samples = [{"suite": "heldout", "id": pid, "score": float(score)} for pid, score in rows]
        samples.append({"suite": "other", "id": "p3", "score": 1.0})  # another suite's row: not counted
        write_jsonl(tmp_path / stage / "generations.jsonl", samples)
    cfg = make_config(CompareConfig, {"rows": {"teacher": "eval_t", "distilled": "eval_s", "rl": "eval_r"},
                                      "reference": "teacher", "budgets": {"rl": "distilled"}, "margins": [["distilled", "rl"]]})
    spec = get_stage("compare")
    out = spec.fn(cfg, StageContext(run_dir=tmp_path, stage_dir=tmp_path, recipe=OmegaConf.create({}), seed=0, outputs=outputs))
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"] == out["comparison"] and saved["budgets"] == out["budgets"] and saved["margins"] == out["margins"]
    assert saved["budgets"] == [{"rl": "rl", "sft": "distilled", "rl_optimizer_steps": 120, "sft_optimizer_steps": 60,
                                 "rl_tokens": 4000, "sft_tokens": 5000, "holds": False}]
    assert "compare: warning: the budget of 'rl' >= 'distilled' does not hold" in capsys.readouterr().err
    [m] = saved["margins"]
    assert {k: m[k] for k in ("a", "b", "n", "a_only", "b_only")} == {"a": "distilled", "b": "rl", "n": 6, "a_only": 3, "b_only": 1}
    assert (m["difference"], m["low"], m["high"]) == pytest.approx((5 / 12, 5 / 12 - 0.531775, 5 / 12 + 0.531775), abs=1e-6)
    assert m["p_value"] == pytest.approx(0.625)
    markdown = (tmp_path / "comparison.md").read_text()
    assert "- rl vs distilled: optimizer steps 120 vs 60, tokens 4,000 vs 5,000: does NOT hold" in markdown
    assert "- distilled - rl: +41.7 points [-11.5, +94.8] over 6 problems; 3 vs 1 won by one side only, p = 0.625" in markdown
    # labels are checked when the recipe loads
    rows = {"a": "eval_s", "b": "eval_r"}
    with pytest.raises(ValueError, match=r"budgets.a='c': 'c' is not a label of rows"):
        CompareConfig(rows=rows, budgets={"a": "c"})
    with pytest.raises(ValueError, match=r"margins\[0\]=\['a', 'a'\]"):
        CompareConfig(rows=rows, margins=[["a", "a"]])
    with pytest.raises(ConfigError, match=r"margins\[0\]=\['a', 'x'\]: 'x' is not a label"):
        make_config(CompareConfig, {"rows": rows, "margins": [["a", "x"]]})


def test_distill_runs_the_tiny_recipe_without_a_model() -> None:
    cfg = load_recipe("distill")
    assert cfg.run.name == "distill" and "compare" in cfg.stages and cfg.v3_base.preset == "tiny"
    # RL alone takes at least the optimizer steps of distillation and samples at least as many sequences as it
    # trains on (the compare stage checks steps and tokens as counted; tests/test_distill_recipe.py runs it)
    for rl, sft in ((cfg.rl_v3, cfg.distill_v3), (cfg.rl_qwen, cfg.distill_qwen)):
        assert rl.model_path == sft.model_path  # from the same base
        assert rl.steps * rl.algorithm.updates_per_step >= sft.steps
        assert rl.steps * rl.rollout.prompts_per_step * rl.rollout.group_size >= sft.steps * sft.batch_size
        assert rl.data.heldout_path.endswith(".valid_path")  # RL's own check never reads the test split
    assert cfg.distill_v3_kl.loss == "kl" and cfg.v3_base.tokenizer_path == cfg.distill_v3_kl.teacher_path
    real = load_recipe("distill", ["model.path=/ckpt/DeepSeek-R1"])
    assert real.teacher.model_path == "/ckpt/DeepSeek-R1" and "distill_qwen" in real.stages
    with pytest.raises(ConfigError, match="v3_base.preset=.gpt9."):
        load_recipe("distill", ["v3_base.preset=gpt9"])
