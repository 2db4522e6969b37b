"""The trainer group on the supervised loss (SFT and pretraining), on Ray with gloo: 2 FSDP2 workers step like 1
worker on the same batch within 1e-5 (r1pipe's V3 with its MTP module, tiny Qwen2 and Llama; an SFT step and
a pretraining step), each holds about half the parameter and optimizer bytes, and a checkpoint written by 2
workers resumes on 1 and continues like the 2."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1pipe.algo.sft import SupervisedLoss
from r1pipe.causal_lm import init_dense_student
from r1pipe.data.batch import TrainBatch, build_batch, collate
from r1pipe.workers.group import PolicyGroup
from r1pipe.workers.policy import PolicyConfig
from tiny_models import make_tiny_v3


# the two layouts sum gradients in another order (fp32 rounding ~1e-9), which AdamW turns into a step of up to lr
# on a coordinate whose gradient is itself ~eps; a larger eps keeps such steps proportional to the gradient, so
# the layouts' weights stay ~1e-10 apart and no token's top-k expert choice flips between them at the next step
CFG = PolicyConfig(lr=1e-4, adam_betas=(0.9, 0.95), adam_eps=1e-6, weight_decay=0.1, micro_batch_size=3, num_threads=1,
                   supervised=SupervisedLoss(mtp=True))


pytestmark = pytest.mark.usefixtures("ray_cluster")  # a 2-CPU Ray cluster for the module (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    v3 = make_tiny_v3(root / "v3", num_nextn_predict_layers=1)
    return {"v3": str(v3), "qwen2": str(init_dense_student("tiny-qwen2", v3, root / "qwen2", seed=1)),
            "llama": str(init_dense_student("tiny-llama", v3, root / "llama", seed=2))}


def sft_batch(seed: int, rows: int = 7) -> TrainBatch:
    """Rows of mixed length whose targets are two assistant spans (a chat with two turns), so the mask is not
    one suffix."""
    rng = random.Random(seed)
    sequences, masks = [], []
    for _ in range(rows):
        parts = [rng.randint(2, 6) for _ in range(4)]  # user, assistant, user, assistant
        sequences.append([rng.randrange(3, 300) for _ in range(sum(parts))])
        masks.append([k % 2 == 1 for k, n in enumerate(parts) for _ in range(n)])
    return collate(sequences, masks, pad_id=0)


def pretrain_batch(seed: int, rows: int = 8) -> TrainBatch:
    """Pretraining rows: a prompt, then a completion + eos that is the target (as the pretrain stage builds them)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(3, 7))] for _ in range(rows)]
    completions = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 9))] + [1] for _ in range(rows)]
    return build_batch(prompts, completions, pad_id=0)


def weights(group: PolicyGroup, path: Path) -> dict[str, torch.Tensor]:
    group.save_checkpoint(str(path), None)
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.parametrize("family", ["v3", "qwen2", pytest.param("llama", marks=pytest.mark.slow)])
def test_two_sharded_workers_step_like_one_on_sft_and_hold_half_the_bytes(models, tmp_path, family):
    one, two = PolicyGroup(1, models[family], CFG), PolicyGroup(2, models[family], CFG)
    assert one.mtp_depth == (1 if family == "v3" else 0)
    before = {k: v for f in sorted(Path(models[family]).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    for seed in (0, 1):
        batch = sft_batch(seed)
        s1, s2 = one.supervised_step(batch, lr=1e-4), two.supervised_step(batch, lr=1e-4)
        assert s1["targets"] == s2["targets"] == batch.num_targets()
        assert abs(s1["loss"] - s2["loss"]) <= 1e-5 * s1["loss"]
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1, s1["grad_norm"])
        if family == "v3":
            assert s1["mtp"] > 0 and abs(s1["mtp"] - s2["mtp"]) <= 1e-5
    a = weights(one, tmp_path / "one")
    assert_same(a, weights(two, tmp_path / "two"))
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-5  # the steps moved the weights
    probe = sft_batch(9)
    assert abs(one.eval_loss(probe) - two.eval_loss(probe)) <= 1e-5

    whole, halves = one.memory()[0], two.memory()
    for kind in ("parameters", "optimizer"):
        assert whole[kind] <= sum(h[kind] for h in halves) <= 1.05 * whole[kind]
        for h in halves:
            assert 0.4 <= h[kind] / whole[kind] <= 0.6, (kind, h[kind], whole[kind])

    # a checkpoint of the 2 sharded workers resumes on 1 worker and continues like the 2
    resumed = PolicyGroup(1, models[family], CFG)
    resumed.load_checkpoint(str(tmp_path / "two"))
    batch = sft_batch(2)
    r, t = resumed.supervised_step(batch, lr=1e-4), two.supervised_step(batch, lr=1e-4)
    assert abs(r["loss"] - t["loss"]) <= 1e-5 * t["loss"]
    assert_same(weights(resumed, tmp_path / "resumed"), weights(two, tmp_path / "two-after"))
    for g in (one, two, resumed):
        g.shutdown()


def test_a_pretraining_step_on_two_workers_is_one_workers(models, tmp_path):
    one, two = PolicyGroup(1, models["v3"], CFG), PolicyGroup(2, models["v3"], CFG)
    batch = pretrain_batch(0)
    s1, s2 = one.supervised_step(batch, lr=1e-4), two.supervised_step(batch, lr=1e-4)
    assert s1["targets"] == s2["targets"] == float(batch.response_mask.sum())
    assert abs(s1["loss"] - s2["loss"]) <= 1e-5 * s1["loss"]
    assert_same(weights(one, tmp_path / "one"), weights(two, tmp_path / "two"))
    for g in (one, two):
        g.shutdown()


def test_the_supervised_loss_is_the_masked_mean_ce_plus_lambda_mtp(models):
    """One worker, one micro-batch: the step's reported loss is mean CE over the targets + mtp_lambda x the MTP
    module's mean CE over its targets (hand-assembled from the model's own logits), and prompt tokens carry no
    loss."""
    from r1pipe.causal_lm import load_model, run_model
    from r1pipe.model.loss import masked_ce_sum

    batch = sft_batch(5)
    model = load_model(models["v3"])
    with torch.no_grad():
        out = run_model(model, batch.input_ids, batch.attention_mask, mtp=True)
    mask = batch.target_mask
    ce, n = masked_ce_sum(out.logits, batch.input_ids, mask)
    mtp, n2 = masked_ce_sum(out.mtp_logits[0], batch.input_ids, mask, shift=2)
    expected = ce / n + model.config.mtp_lambda * mtp / n2
    group = PolicyGroup(1, models["v3"], PolicyConfig(lr=1e-4, micro_batch_size=64, num_threads=1))
    got = group.supervised_step(batch, lr=1e-4)
    assert got["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert got["ce"] == pytest.approx(float(ce / n), abs=1e-5)
    group.shutdown()


def test_expert_parallel_workers_step_like_one_on_sft_and_resume_on_one(models, tmp_path):
    """ep_size 2 (each rank 8 of the 16 experts, tokens sent by all-to-all; FSDP2 for the rest) against 1 worker:
    one micro-batch per row, so the rank with fewer rows joins the MoE collectives idle, MTP modules included."""
    cfg = dataclasses.replace(CFG, micro_batch_size=1)
    one, two = PolicyGroup(1, models["v3"], cfg), PolicyGroup(2, models["v3"], dataclasses.replace(cfg, ep_size=2))
    for seed in (0, 1):
        batch = sft_batch(seed, rows=5)
        s1, s2 = one.supervised_step(batch, lr=1e-4), two.supervised_step(batch, lr=1e-4)
        assert abs(s1["loss"] - s2["loss"]) <= 1e-5 * s1["loss"] and abs(s1["mtp"] - s2["mtp"]) <= 1e-5
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * max(1, s1["grad_norm"])
        assert s1["maxvio"] == pytest.approx(s2["maxvio"], abs=1e-6)
    assert_same(weights(one, tmp_path / "one"), weights(two, tmp_path / "two"))
    halves = two.memory()
    assert all(0.4 <= h["parameters"] / one.memory()[0]["parameters"] <= 0.6 for h in halves)
    resumed = PolicyGroup(1, models["v3"], cfg)  # the ep_size-2 checkpoint on one worker
    resumed.load_checkpoint(str(tmp_path / "two"))
    batch = sft_batch(2, rows=5)
    r, t = resumed.supervised_step(batch, lr=1e-4), two.supervised_step(batch, lr=1e-4)
    assert abs(r["loss"] - t["loss"]) <= 1e-5 * t["loss"]
    assert_same(weights(resumed, tmp_path / "resumed"), weights(two, tmp_path / "two-after"))
    for g in (one, two, resumed):
        g.shutdown()
