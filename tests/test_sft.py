"""The `sft` stage: held-out loss falls on r1pipe's V3 and on a Hugging Face Qwen2 student, the loss
is exact on assistant tokens only, gradient accumulation equals the full batch, saved models load
in their frameworks, and a SIGKILLed run resumes to the same weights as an uninterrupted one."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from r1pipe.algo.sft import forward_kl_sum, masked_ce_sum
from r1pipe.causal_lm import load_model, run_model
from r1pipe.config import load_recipe, make_config
from r1pipe.data.batch import EpochOrder
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.run import run_recipe
from r1pipe.stages import StageContext
from r1pipe.stages.configs import SFTConfig
from r1pipe.stages.sft import load_data, run_sft
from tiny_models import make_tiny_qwen2, make_tiny_v3, write_worked_solutions

pytestmark = pytest.mark.usefixtures("ray_cluster")  # a 2-CPU Ray cluster for the module (conftest)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, str]:
    """A BPE tokenizer, a tiny V3, a tiny Qwen2 and 240 worked arithmetic solutions."""
    root = tmp_path_factory.mktemp("sft")
    make_tiny_v3(root / "v3")
    make_tiny_qwen2(root / "qwen2", root / "v3")
    write_worked_solutions(root / "sft.jsonl", 240)
    return {"root": str(root), "v3": str(root / "v3"), "qwen2": str(root / "qwen2"), "data": str(root / "sft.jsonl")}


def context(run_dir: Path, model: str) -> StageContext:
    return StageContext(run_dir=run_dir, stage_dir=run_dir / "sft", recipe=OmegaConf.create({"model": {"path": model}}), seed=0)


def sft_config(task: dict, **overrides) -> SFTConfig:
    fields = {"data.train_path": task["data"], "steps": 24, "batch_size": 16, "micro_batch_size": 8, "optim.lr": 3e-3,
              "optim.warmup_steps": 3, "checkpoint.every": 8, "data.heldout_fraction": 0.1, "resources.trainer.threads": 1}
    return make_config(SFTConfig, {**fields, **overrides})


@pytest.fixture(scope="module")
def sft_run(task, tmp_path_factory):
    """sft_run(family): the outputs and run directory of sft_config's run on that student, run once for the
    module (the V3 one is also the distillation test's teacher)."""
    runs: dict[str, tuple[dict, Path]] = {}

    def run(family: str) -> tuple[dict, Path]:
        if family not in runs:
            run_dir = tmp_path_factory.mktemp(f"sft_{family}")
            runs[family] = run_sft(sft_config(task), context(run_dir, task[family])), run_dir
        return runs[family]

    return run


@pytest.mark.parametrize("family", ["v3", "qwen2"])
def test_sft_lowers_heldout_loss_and_saves_a_loadable_model(task, sft_run, family):
    out, tmp_path = sft_run(family)
    assert out["val_loss_end"] < 0.6 * out["val_loss_start"], out
    # the budget: 24 optimizer steps; trained tokens are the targets of the examples each step took, counted here
    examples, _, _ = load_data(sft_config(task), context(tmp_path, task[family]), load_tokenizer(task[family]), 512)
    order = EpochOrder(len(examples), 16, seed=0)
    targets = sum(sum(examples[i].target_mask[1:]) for step in range(24) for i in order.step(step))
    lengths = sum(len(examples[i].input_ids) for step in range(24) for i in order.step(step))
    assert (out["optimizer_steps"], out["trained_tokens"], out["tokens"]) == (24, targets, lengths)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert (summary["optimizer_steps"], summary["trained_tokens"], summary["tokens"]) == (24, targets, lengths)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))
    assert {"lr", "grad_norm", "tokens_per_second"} <= set(rows[-1])
    assert (tmp_path / "sft" / "plots" / "loss.png").is_file()
    # the saved model loads in its own framework and in transformers, with the same logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([load_tokenizer(out["model_path"])("What is 12 + 30?").input_ids])
    ours = load_model(out["model_path"]).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out["model_path"], dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("DeepseekV3ForCausalLM" if family == "v3" else "Qwen2ForCausalLM")
    with torch.no_grad():
        diff = run_model(ours, ids).logits - theirs(ids).logits
    assert diff.abs().max() < 1e-4


def test_masked_ce_sum_hand_checked():
    # vocabulary of 2; logits [0, ln 3] at every position: p(token 1) = 3/4, p(token 0) = 1/4
    logits = torch.tensor([[[0.0, float(torch.log(torch.tensor(3.0)))]] * 4])
    ids = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[False, False, True, True]])  # targets: token 2 (a 0) and token 3 (a 1)
    total, count = masked_ce_sum(logits, ids, mask)
    assert count == 2
    assert torch.isclose(total, -torch.log(torch.tensor(0.25)) - torch.log(torch.tensor(0.75)))
    mtp_total, mtp_count = masked_ce_sum(logits, ids, mask, shift=2)  # position t predicts t + 2
    assert mtp_count == 2 and torch.isclose(mtp_total, total)


def test_prompt_targets_do_not_change_the_loss(task):
    lm = load_model(task["v3"])
    tok = load_tokenizer(task["v3"])
    prompt = tok("A question: What is 12 + 30? Assistant:", add_special_tokens=False).input_ids
    answer = tok(" <answer> 42 </answer>", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + answer])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(answer)])
    with torch.no_grad():
        logits = run_model(lm, ids).logits
    loss, _ = masked_ce_sum(logits, ids, mask)
    other_prompt = ids.clone()
    other_prompt[0, 1: len(prompt)] = (other_prompt[0, 1: len(prompt)] + 7) % len(tok)  # the prompt's targets changed
    assert torch.equal(masked_ce_sum(logits, other_prompt, mask)[0], loss)
    other_answer = ids.clone()
    other_answer[0, -2] = (other_answer[0, -2] + 7) % len(tok)
    assert not torch.equal(masked_ce_sum(logits, other_answer, mask)[0], loss)


def test_micro_batches_give_the_full_batch_update(task, tmp_path):
    """Micro-batches of 2 and one micro-batch of 8: the same update (the loss is normalised by the step's
    target count, not per micro-batch)."""
    weights = []
    for micro in (2, 8):
        # a small lr: AdamW turns a coordinate whose gradient is ~eps (summed in another order) into a step ~lr
        out = run_sft(sft_config(task, micro_batch_size=micro, batch_size=8, steps=2, **{"checkpoint.every": 2, "optim.lr": 1e-5}),
                      context(tmp_path / str(micro), task["qwen2"]))
        weights.append(load_weights(Path(out["model_path"])))
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-6


def test_epochs_cover_the_training_split_once_each(task):
    tok = load_tokenizer(task["v3"])
    cfg = sft_config(task)
    examples, heldout, _ = load_data(cfg, context(Path(task["root"]) / "plan", task["v3"]), tok, 512)
    order = EpochOrder(len(examples), 16, seed=0)
    for epoch in range(2):
        seen = [examples[i].id for step in range(order.steps_per_epoch) for i in order.step(epoch * order.steps_per_epoch + step)]
        assert sorted(seen) == sorted(e.id for e in examples) and not {e.id for e in heldout} & set(seen)
    assert order.step(0) != order.step(order.steps_per_epoch)  # a fresh permutation each epoch


RECIPE = """
run: {{name: sft-resume, out_dir: runs, seed: 0}}
model: {{path: {model}}}
stages: [sft]
sft: {{kind: sft, data: {{train_path: {data}}}, steps: 12, batch_size: 8, micro_batch_size: 4, optim: {{lr: 3.0e-3}},
      checkpoint: {{every: 3}}, resources: {{trainer: {{threads: 1, workers: {workers}, cpus: {cpus}}}}}, eval_every: 4}}
"""


def command(recipe: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "r1pipe.cli", "run", str(recipe), "--run-dir", str(run_dir)]


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])  # r1-tiny's SFT layout: 2 workers
def test_sigkill_then_same_command_gives_the_uninterrupted_weights(task, tmp_path, workers, killed_run):
    """SIGKILL mid-run, then the same command: it resumes after the newest checkpoint (no step lost or run
    twice) and ends on the uninterrupted run's weights (the same recipe run here meanwhile), in the recipe's
    own worker layout."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(model=task["v3"], data=task["data"], workers=workers, cpus=2 // workers))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ckpt = killed / "sft" / "checkpoints" / "step_000006" / "trainer_state.json"
    run = killed_run(command(recipe, killed), ckpt)
    run_recipe(load_recipe(str(recipe)), straight)
    err = run.wait()
    assert ckpt.exists() and not (killed / "sft" / "DONE.json").exists(), err
    again = subprocess.Popen(command(recipe, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-2000:]
    steps = [json.loads(line)["step"] for line in (killed / "sft" / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if s > 0]
    assert trained == list(range(1, 13))  # each step logged once: the restart began after step 6, not at 0
    done = [json.loads((d / "sft" / "DONE.json").read_text()) for d in (straight, killed)]
    assert done[1]["trained_tokens"] == done[0]["trained_tokens"] > 0 and done[1]["optimizer_steps"] == 12  # kept over the resume

    a = load_weights(straight / "sft" / "model")
    b = load_weights(killed / "sft" / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    metrics = [json.loads(line) for line in (killed / "sft" / "metrics.jsonl").read_text().splitlines()]
    straight_metrics = [json.loads(line) for line in (straight / "sft" / "metrics.jsonl").read_text().splitlines()]
    final = {r["step"]: r for r in metrics if "val_loss" in r}
    assert final[12]["val_loss"] == pytest.approx({r["step"]: r for r in straight_metrics if "val_loss" in r}[12]["val_loss"], abs=1e-6)


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def precision_context(run_dir: Path, model: str, **precision) -> StageContext:
    recipe = OmegaConf.create({"model": {"path": model, **precision}})
    return StageContext(run_dir=run_dir, stage_dir=run_dir / "sft", recipe=recipe, seed=0)


@pytest.mark.parametrize("family", ["v3", "qwen2"])
def test_bf16_recipe_trains_over_fp32_masters(task, tmp_path, family):
    out = run_sft(sft_config(task, steps=8), precision_context(tmp_path, task[family], dtype="bfloat16"))
    assert out["val_loss_end"] < out["val_loss_start"]
    saved = load_weights(Path(out["model_path"]))
    assert all(v.dtype == torch.float32 for v in saved.values())


def test_fp8_recipe_trains_fp8_projections(task, tmp_path):
    from r1pipe.model.fp8 import FP8Linear
    from r1pipe.model.precision import Precision

    lm = load_model(task["v3"], Precision(fp8=True))
    assert sum(isinstance(m, FP8Linear) for m in lm.modules()) > 4
    out = run_sft(sft_config(task, steps=6), precision_context(tmp_path, task["v3"], fp8=True))
    assert out["val_loss_end"] < out["val_loss_start"]
    with pytest.raises(ValueError, match="model.fp8: FP8 compute is for r1pipe's DeepSeek-V3"):
        load_model(task["qwen2"], Precision(fp8=True))


def test_forward_kl_hand_checked():
    # vocabulary of 2, one target (the token at position 1): teacher p = (1/2, 1/2), student q = (1/4, 3/4)
    ln3 = float(torch.log(torch.tensor(3.0)))
    student = torch.tensor([[[0.0, ln3], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [5.0, 1.0]]])
    mask = torch.tensor([[False, True]])
    kl, count = forward_kl_sum(student, teacher, mask)
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert count == 1 and torch.isclose(kl, expected)
    assert torch.isclose(forward_kl_sum(teacher, teacher, mask)[0], torch.tensor(0.0))
    # temperature 2 softens both: logits halved, the sum scaled by 4
    kl2, _ = forward_kl_sum(student, teacher, mask, temperature=2.0)
    assert torch.isclose(kl2, 4 * forward_kl_sum(student / 2, teacher / 2, mask)[0])


def test_logit_distillation_from_a_teacher(task, sft_run, tmp_path):
    teacher = sft_run("v3")[0]["model_path"]  # 24 steps of SFT on the data
    student = run_sft(sft_config(task, steps=12, loss="kl", teacher_path=teacher, mtp=False),
                      context(tmp_path / "student", task["v3"]))
    assert student["val_loss_end"] < 0.7 * student["val_loss_start"]  # held-out CE falls under a KL-only loss
    rows = [json.loads(line) for line in (tmp_path / "student" / "sft" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert len(kls) == 12 and kls[-1] < kls[0]
    with pytest.raises(ValueError, match="needs teacher_path"):
        sft_config(task, loss="kl")


def test_distillation_refuses_a_teacher_with_another_tokenizer(task, tmp_path):
    other = make_tiny_v3(tmp_path / "other", vocab_size=350)
    with pytest.raises(ValueError, match="teacher's tokenizer differs"):
        run_sft(sft_config(task, loss="ce+kl", teacher_path=str(other)), context(tmp_path, task["v3"]))


def test_long_examples_are_skipped_or_truncated_and_counted(task, tmp_path):
    tok = load_tokenizer(task["v3"])
    ctx = context(tmp_path, task["v3"])
    kept, _, report = load_data(sft_config(task, **{"data.heldout_fraction": 0.0}), ctx, tok, 112)
    long = report["train"]["reasons"]["longer than max_length"]
    assert long > 0 and len(kept) + long == 240 and all(len(e) <= 112 for e in kept)
    cut, _, report = load_data(sft_config(task, **{"data.heldout_fraction": 0.0, "data.truncate": True}), ctx, tok, 112)
    assert report["train"]["truncated"] == long and len(cut) == 240 and all(len(e) <= 112 for e in cut)
    assert "longer than max_length" not in report["train"]["reasons"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1pipe.cli", "run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_an_empty_dataset_is_one_error_line_before_any_actor_starts(task, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(model=task["v3"], data=empty, workers=1, cpus=1))
    done = run_cli(str(recipe), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and str(empty) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert "Ray instance" not in done.stderr + done.stdout  # it failed before Ray (and any actor) started


def test_a_trainer_the_cluster_cannot_hold_fails_within_a_minute_with_the_numbers(task, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(model=task["v3"], data=task["data"], workers=8, cpus=1))
    t0 = time.time()
    done = run_cli(str(recipe), "cluster.num_cpus=2", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2 and time.time() - t0 < 60, done.stderr
    assert "CPU: asked 8" in done.stderr and "available 2" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
