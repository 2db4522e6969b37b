"""The `sft` stage: held-out loss falls on r1pipe's V3 and on a Hugging Face Qwen2 student, the loss
is exact on assistant tokens only, gradient accumulation equals the full batch, saved models load
in their frameworks, and a SIGKILLed run resumes to the same weights as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from r1pipe.algo.sft import forward_kl_sum, masked_ce_sum
from r1pipe.causal_lm import load_causal_lm
from r1pipe.config import make_config
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.stages import StageContext
from r1pipe.stages.configs import SFTConfig
from r1pipe.stages.sft import SFTTrainer, StepPlan, collate, run_sft
from tiny_models import make_tiny_qwen2, make_tiny_v3, write_worked_solutions


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


@pytest.mark.parametrize("family", ["v3", "qwen2"])
def test_sft_lowers_heldout_loss_and_saves_a_loadable_model(task, tmp_path, family):
    out = run_sft(sft_config(task), context(tmp_path, task[family]))
    assert out["val_loss_end"] < 0.6 * out["val_loss_start"], out
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))
    assert {"lr", "grad_norm", "tokens_per_second"} <= set(rows[-1])
    assert (tmp_path / "sft" / "plots" / "loss.png").is_file()
    # the saved model loads in its own framework and in transformers, with the same logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([load_tokenizer(out["model_path"])("What is 12 + 30?").input_ids])
    ours = load_causal_lm(out["model_path"])
    theirs = AutoModelForCausalLM.from_pretrained(out["model_path"], dtype=torch.float32).eval()
    assert ours.family == ("deepseek_v3" if family == "v3" else "qwen2")
    with torch.no_grad():
        diff = (ours.module.eval()(ids).logits if family == "v3" else ours.forward(ids)[0]) - theirs(ids).logits
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
    lm = load_causal_lm(task["v3"])
    tok = load_tokenizer(task["v3"])
    prompt = tok("A question: What is 12 + 30? Assistant:", add_special_tokens=False).input_ids
    answer = tok(" <answer> 42 </answer>", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + answer])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(answer)])
    with torch.no_grad():
        logits = lm.forward(ids)[0]
    loss, _ = masked_ce_sum(logits, ids, mask)
    other_prompt = ids.clone()
    other_prompt[0, 1: len(prompt)] = (other_prompt[0, 1: len(prompt)] + 7) % len(tok)  # the prompt's targets changed
    assert torch.equal(masked_ce_sum(logits, other_prompt, mask)[0], loss)
    other_answer = ids.clone()
    other_answer[0, -2] = (other_answer[0, -2] + 7) % len(tok)
    assert not torch.equal(masked_ce_sum(logits, other_answer, mask)[0], loss)


def test_gradient_accumulation_equals_the_full_batch(task, tmp_path):
    """Micro-batches of 2 and one micro-batch of 8: the same gradient, so the same SGD update (the
    loss is normalised by the step's target count, not per micro-batch)."""
    weights = []
    for micro in (2, 8):
        trainer = SFTTrainer(sft_config(task, micro_batch_size=micro, batch_size=8), context(tmp_path / str(micro), task["qwen2"]))
        lm = load_causal_lm(task["qwen2"])
        tok = load_tokenizer(task["qwen2"])
        examples, _, _ = trainer.load_data(tok, 512)
        plan = StepPlan(examples, 8, micro, seed=0)
        optimizer = torch.optim.SGD(lm.module.parameters(), lr=0.1)
        trainer.train_step(lm, optimizer, plan.step(0), tok.pad_token_id)
        weights.append({k: v.clone() for k, v in lm.module.state_dict().items()})
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-6


def test_length_grouped_batches_cover_each_epoch_once(task):
    tok = load_tokenizer(task["v3"])
    trainer = SFTTrainer(sft_config(task), context(Path(task["root"]) / "plan", task["v3"]))
    examples, heldout, _ = trainer.load_data(tok, 512)
    plan = StepPlan(examples, 16, 4, seed=0)
    seen = [e.id for step in range(plan.steps_per_epoch) for micro in plan.step(step) for e in micro]
    assert sorted(seen) == sorted(e.id for e in examples) and not {e.id for e in heldout} & set(seen)
    for micro in plan.step(0):  # longest first within a step, so micro-batches hold similar lengths
        assert [len(e) for e in micro] == sorted((len(e) for e in micro), reverse=True)
    batch = collate(plan.step(0)[0], tok.pad_token_id)
    assert batch.target_mask.sum() == sum(e.num_targets for e in plan.step(0)[0])


RECIPE = """
run: {{name: sft-resume, out_dir: runs, seed: 0}}
model: {{path: {model}}}
stages: [sft]
sft: {{kind: sft, data: {{train_path: {data}}}, steps: 12, batch_size: 8, micro_batch_size: 4, optim: {{lr: 3.0e-3}},
      checkpoint: {{every: 3}}, resources: {{trainer: {{threads: 1}}}}, eval_every: 4}}
"""


def run_command(recipe: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "r1pipe.cli", "run", str(recipe), "--run-dir", str(run_dir)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_then_same_command_gives_the_uninterrupted_weights(task, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(model=task["v3"], data=task["data"]))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_command(recipe, straight).wait(timeout=600) == 0

    proc = run_command(recipe, killed)
    ckpt = killed / "sft" / "checkpoints" / "step_000006" / "trainer_state.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "sft" / "DONE.json").exists()
    again = run_command(recipe, killed)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-2000:]
    assert b"resuming after step" in err or (killed / "sft" / "DONE.json").exists()

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
    trainer = SFTTrainer(sft_config(task, steps=8), precision_context(tmp_path, task[family], dtype="bfloat16"))
    out = trainer.run()
    assert out["val_loss_end"] < out["val_loss_start"]
    saved = load_weights(Path(out["model_path"]))
    assert all(v.dtype == torch.float32 for v in saved.values())


def test_fp8_recipe_trains_fp8_projections(task, tmp_path):
    from r1pipe.model.fp8 import FP8Linear
    from r1pipe.model.precision import Precision

    lm = load_causal_lm(task["v3"], Precision(fp8=True))
    assert sum(isinstance(m, FP8Linear) for m in lm.module.modules()) > 4
    out = SFTTrainer(sft_config(task, steps=6), precision_context(tmp_path, task["v3"], fp8=True)).run()
    assert out["val_loss_end"] < out["val_loss_start"]
    with pytest.raises(ValueError, match="model.fp8: FP8 compute is for r1pipe's DeepSeek-V3"):
        load_causal_lm(task["qwen2"], Precision(fp8=True))


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


def test_logit_distillation_from_a_teacher(task, tmp_path):
    teacher = run_sft(sft_config(task, steps=16), context(tmp_path / "teacher", task["v3"]))["model_path"]
    student = SFTTrainer(sft_config(task, steps=12, loss="kl", teacher_path=teacher, mtp=False),
                         context(tmp_path / "student", task["v3"])).run()
    assert student["val_loss_end"] < 0.7 * student["val_loss_start"]  # held-out CE falls under a KL-only loss
    rows = [json.loads(line) for line in (tmp_path / "student" / "sft" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert len(kls) == 12 and kls[-1] < kls[0]
    with pytest.raises(ValueError, match="needs teacher_path"):
        sft_config(task, loss="kl")


def test_distillation_refuses_a_teacher_with_another_tokenizer(task, tmp_path):
    other = make_tiny_v3(tmp_path / "other", vocab_size=350)
    trainer = SFTTrainer(sft_config(task, loss="ce+kl", teacher_path=str(other)), context(tmp_path, task["v3"]))
    with pytest.raises(ValueError, match="teacher's tokenizer differs"):
        trainer.run()
