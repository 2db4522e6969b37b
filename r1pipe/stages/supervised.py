"""The supervised loop of the `pretrain` and `sft` stages, over the trainer group.

The driver holds the tokenized examples and the data position; the trainer group (r1pipe.workers.group:
r1pipe's V3 or a transformers model, FSDP2-sharded over its workers) holds the model and runs the loss.
Each step takes the next batch of the epoch order (r1pipe.data.batch.EpochOrder), collates it, hands it
to the group with the step's learning rate, logs, and every `checkpoint_every` steps writes the one
checkpoint format of every stage: DCP shards of model and optimizer, each rank's RNG, the Hugging Face
model beside them, and the step (the data position) in the trainer state. A run killed at any point
and started again resumes from its newest checkpoint, on any worker count, to the same weights.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r1pipe.algo.schedule import scheduled_lr
from r1pipe.causal_lm import check_expert_parallel
from r1pipe.data.batch import EpochOrder, TrainBatch, collate
from r1pipe.data.rows import SFTExample
from r1pipe.algo.sft import SupervisedLoss
from r1pipe.model.precision import Precision
from r1pipe.stages.sections import Optim, Parallelism, TrainerResources
from r1pipe.tracking import MetricsLogger, StepProgress
from r1pipe.tracking.checkpoints import (
    atomic_write, check_room_for_checkpoints, latest_checkpoint, tree_bytes, write_checkpoint,
)
from r1pipe.workers.cluster import ray_init
from r1pipe.workers.group import PolicyGroup
from r1pipe.workers.placement import Placement, ResourcePlan, reserve, role_resources
from r1pipe.workers.policy import PolicyConfig

CHECKPOINT_EXTRAS = ("sharded", "rng_rank*.pt", "trainer_state.json")  # what a checkpoint holds beyond the model


@dataclass
class Schedule:
    """The learning rate of each step: a recipe's `optim` section over the stage's steps (algo.schedule)."""

    optim: Optim
    total_steps: int

    def at(self, step: int) -> float:
        o = self.optim
        return scheduled_lr(o.schedule, step, self.total_steps, o.warmup_steps, o.lr, o.min_lr_ratio)


@dataclass
class SupervisedRun:
    """One stage's supervised training: what it trains on, from which model, and how often it saves."""

    name: str  # the stage kind, in progress lines and errors
    stage_dir: Path
    model_path: str  # the initial model (Hugging Face layout, with its tokenizer)
    examples: list[SFTExample]
    heldout: list[SFTExample]
    batch_size: int
    schedule: Schedule
    trainer: PolicyConfig
    resources: TrainerResources  # the stage's `resources` section
    recipe: Any  # the whole recipe (its cluster section starts Ray)
    seed: int
    pad_id: int
    checkpoint_every: int
    keep_checkpoints: int = 2
    eval_every: int = 0  # validation loss every N steps (and at the start and the end)
    teacher_path: str | None = None  # the frozen teacher of logit distillation
    show: tuple[str, ...] = ("loss", "val_loss", "tokens_per_second")

    @property
    def ckpt_root(self) -> Path:
        return self.stage_dir / "checkpoints"


def trainer_policy(optim: Optim, resources: TrainerResources, parallelism: Parallelism, loss: SupervisedLoss,
                   micro_batch_size: int, seed: int, precision: Precision) -> PolicyConfig:
    """What each trainer worker needs, from a stage's shared sections."""
    return PolicyConfig(lr=optim.lr, weight_decay=optim.weight_decay, adam_betas=tuple(optim.betas), grad_clip=optim.grad_clip,
                        supervised=loss, micro_batch_size=micro_batch_size, device=resources.device,
                        num_threads=resources.trainer.threads, seed=seed, precision=precision, fsdp=parallelism.fsdp,
                        fsdp_keep_gathered=parallelism.fsdp_keep_gathered, ep_size=parallelism.ep_size,
                        activation_checkpointing=parallelism.activation_checkpointing)


def start_group(run: SupervisedRun) -> tuple[PolicyGroup, Placement]:
    """The trainer group in a placement group reserved for it (failing within the timeout, with the
    arithmetic, when the cluster cannot hold it)."""
    r, t = run.resources, run.resources.trainer
    check_expert_parallel(run.model_path, run.trainer.ep_size, t.workers, f"{run.stage_dir.name}.parallelism.ep_size")
    ray_init(run.recipe)
    plan = ResourcePlan([role_resources("policy", t, f"{run.stage_dir.name}.resources.trainer")])
    placement = reserve(plan, r.placement_timeout_s, r.placement_strategy, stage=run.name)
    group = PolicyGroup(t.workers, run.model_path, run.trainer, run.teacher_path, placement=placement)
    return group, placement


def batch_of(examples: list[SFTExample], pad_id: int) -> TrainBatch:
    return collate([e.input_ids for e in examples], [e.target_mask for e in examples], pad_id)


def validation_loss(group: PolicyGroup, run: SupervisedRun) -> float | None:
    """Mean next-token CE on the held-out examples' targets (None without any)."""
    if not run.heldout:
        return None
    return group.eval_loss(batch_of(run.heldout, run.pad_id))


def save(group: PolicyGroup, run: SupervisedRun, step: int, state: dict, need_bytes: int) -> None:
    state["step"] = step
    write_checkpoint(run.ckpt_root, step, lambda staging: group.save_checkpoint(str(staging), run.model_path), state,
                     keep=run.keep_checkpoints, need_bytes=need_bytes)


def train(run: SupervisedRun, on_step: Callable[[int, dict], None] | None = None) -> tuple[Path, dict]:
    """Train `run` to its last step (resuming from its newest checkpoint) and return that checkpoint and its
    trainer state (step, tokens, trained_tokens, wall_seconds, val_loss_start, val_loss_end, train_loss).
    `tokens` counts every non-padding token of the steps' sequences, `trained_tokens` their targets (the
    tokens the loss trains on); None when resumed from a checkpoint that did not count them."""
    order = EpochOrder(len(run.examples), run.batch_size, run.seed)
    total = run.schedule.total_steps
    resume = latest_checkpoint(run.ckpt_root)
    if resume is not None and resume[1]["step"] >= total:  # killed after its last save
        return resume
    group, placement = start_group(run)
    try:
        state: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "wall_seconds": 0.0, "val_loss_start": None}
        if resume is not None:
            group.load_checkpoint(str(resume[0]))
            state = {"trained_tokens": None, **resume[1]}
            print(f"{run.name}: resuming after step {state['step']} from {resume[0]}")
        # a run that cannot write its checkpoints stops before it trains, not at a later save
        need = group.checkpoint_bytes()
        step = state["step"]
        saves = [s for s in range(step + 1, total + 1) if s % run.checkpoint_every == 0 or s == total]
        check_room_for_checkpoints(run.ckpt_root, need, len(saves), run.keep_checkpoints)
        logger = MetricsLogger(run.stage_dir, resume_step=step)
        if state["val_loss_start"] is None:
            state["val_loss_start"] = validation_loss(group, run)
            if state["val_loss_start"] is not None:
                logger.log(0, {"val_loss": state["val_loss_start"]})
        val_loss = state.get("val_loss_end", state["val_loss_start"])
        t_start = time.perf_counter() - state["wall_seconds"]
        with StepProgress(total, step, run.name, show=run.show) as progress:
            while step < total:
                t0 = time.perf_counter()
                lr = run.schedule.at(step)
                metrics = group.supervised_step(batch_of([run.examples[i] for i in order.step(step)], run.pad_id), lr)
                step += 1
                state["tokens"] += int(metrics["tokens"])
                if state["trained_tokens"] is not None:
                    state["trained_tokens"] += int(metrics["targets"])
                metrics.update(lr=lr, epoch=step / order.steps_per_epoch,
                               tokens_per_second=metrics["tokens"] / max(time.perf_counter() - t0, 1e-9))
                if run.heldout and (step == total or (run.eval_every and step % run.eval_every == 0)):
                    metrics["val_loss"] = val_loss = validation_loss(group, run)
                logger.log(step, metrics)
                progress.advance(metrics)
                if on_step is not None:
                    on_step(step, metrics)
                if step % run.checkpoint_every == 0 or step == total:
                    state.update(wall_seconds=time.perf_counter() - t_start, val_loss_end=val_loss,
                                 train_loss=metrics["loss"])
                    save(group, run, step, state, need)
        logger.close()
    finally:
        group.shutdown()
        placement.remove()
    final = latest_checkpoint(run.ckpt_root)
    assert final is not None and final[1]["step"] == total, f"{run.name} finished without its last checkpoint"
    return final


def export_model(checkpoint: Path, model_dir: Path) -> None:
    """The checkpoint's Hugging Face model and tokenizer, without the trainer's shards and RNG, as model_dir
    (written atomically)."""
    extras = sum(tree_bytes(p) for pattern in CHECKPOINT_EXTRAS for p in checkpoint.glob(pattern))
    with atomic_write(model_dir, tree_bytes(checkpoint) - extras) as tmp:
        shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*CHECKPOINT_EXTRAS))
