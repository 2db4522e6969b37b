"""Stage `sft`: supervised fine-tuning of r1pipe's DeepSeek-V3 or a Hugging Face causal LM, on the
trainer group (r1pipe.stages.supervised: FSDP2-sharded over `num_workers`, the one checkpoint format).

Data comes through the data layer (r1pipe.data) on the driver, before any actor starts: prompt/response
rows rendered with the recipe's template, or chat rows (`messages`) through the tokenizer's chat template
(else the R1 format); rows without trainable text, or longer than the context, are skipped and counted.
The loss is next-token cross-entropy on assistant tokens only (prompt and padding masked), plus the MTP
modules' for V3 (`mtp`), or forward KL to a teacher's logits (`loss: kl | ce+kl`; the teacher is held
without gradients in the same workers, sharded like the student). Each optimizer step's sequences are
split over the workers by tokens and into micro-batches of similar length; the loss is normalised by the
step's whole target count, so the update equals one big batch's on one worker.

Precision follows the recipe's model section: `model.dtype: bfloat16` computes under autocast over
fp32 master weights and optimizer state; `model.fp8` (r1pipe V3 only) computes the projections in
block-scaled FP8 (`model.fp8_exclude` leaves modules out).

Outputs: model_path (final weights + tokenizer, Hugging Face layout: loads in r1pipe for V3 and in
transformers for dense models), the training budget (optimizer_steps; trained_tokens: the target tokens the
loss covered, summed over the steps; tokens: all their non-padding tokens; also in summary.json), metrics
(loss, validation loss, learning rate, grad norm, tokens/s) in metrics.jsonl + TensorBoard + PNG plots.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from r1pipe.algo.sft import SupervisedLoss
from r1pipe.causal_lm import context_length, model_type_of
from r1pipe.data import SFTExample, load_sft_examples
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError, DataError, ModelError
from r1pipe.model.precision import Precision
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import SFTConfig
from r1pipe.stages.supervised import Schedule, SupervisedRun, export_model, train, trainer_policy
from r1pipe.tracking import plot_metrics
from r1pipe.workers.policy import PolicyConfig

SFT_PLOTS = {
    "loss": ("SFT loss (assistant tokens)", ["loss", "ce", "kl", "val_loss"]),
    "lr": ("learning rate", ["lr"]),
    "throughput": ("tokens/s (trained tokens)", ["tokens_per_second"]),
}


def split_heldout(examples: list[SFTExample], fraction: float, limit: int, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, held-out): a seeded random `fraction` (at most `limit`) set aside."""
    n = min(limit, round(len(examples) * fraction)) if len(examples) > 1 else 0
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------- the stage


def run_sft(cfg: SFTConfig, ctx: StageContext) -> dict:
    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    base = start_model(cfg, ctx)
    tokenizer = load_tokenizer(base)
    max_length = cfg.data.max_length or context_length(base)
    train_set, heldout, data_report = load_data(cfg, ctx, tokenizer, max_length)
    teacher = check_teacher(cfg, tokenizer)
    if len(train_set) < cfg.batch_size:
        print(f"sft: warning: {len(train_set)} training example{'s' if len(train_set) != 1 else ''} for "
              f"sft.batch_size={cfg.batch_size}: every step trains on the whole set (an epoch per step, "
              f"repeated {cfg.steps or cfg.epochs}x)", file=sys.stderr)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    run = SupervisedRun(
        name="sft", stage_dir=stage_dir, model_path=str(base), examples=train_set, heldout=heldout,
        batch_size=cfg.batch_size, schedule=Schedule(cfg.optim, total_steps),
        trainer=trainer_config(cfg, ctx), resources=cfg.resources, recipe=ctx.recipe, seed=ctx.seed,
        pad_id=tokenizer.pad_token_id, checkpoint_every=cfg.checkpoint.every, keep_checkpoints=cfg.checkpoint.keep,
        eval_every=cfg.eval_every, teacher_path=teacher,
    )
    print(f"sft: {model_type_of(base)} model from {base}; {len(train_set)} train / {len(heldout)} held-out examples; "
          f"{total_steps} steps of {cfg.batch_size} sequences ({steps_per_epoch} steps per epoch) on "
          f"{cfg.resources.trainer.workers} worker{'s' if cfg.resources.trainer.workers != 1 else ''}")
    final, state = train(run)
    return finish(run, final, state, base, data_report, total_steps)


def start_model(cfg: SFTConfig, ctx: StageContext) -> Path:
    path = Path(cfg.model_path).expanduser() if cfg.model_path else ctx.model_path()
    if not (path / "config.json").is_file():
        raise ModelError(f"sft: model {path} has no config.json (a Hugging Face layout checkpoint is expected)")
    return path


def load_data(cfg: SFTConfig, ctx: StageContext, tokenizer, max_length: int) -> tuple[list[SFTExample], list[SFTExample], dict]:
    """(train, held-out, the data report): rows through the data layer; bad ones skipped and counted here."""
    source = cfg.data.train_path or ctx.output("sft_path")
    if not source:
        raise ConfigError("sft: no training data: set train_path (a file, a save_to_disk directory or a hub name) "
                         "or run a stage that outputs sft_path")
    fields = {"prompt": cfg.data.prompt_field, "response": cfg.data.response_field, "messages": cfg.data.messages_field, "id": cfg.data.id_field}
    options = dict(fields=fields, template=cfg.data.template, max_length=max_length, truncate=cfg.data.truncate, option_prefix="sft.data.")
    train_set, report = load_sft_examples(str(source), tokenizer, split=cfg.data.split, **options)
    reports = {"train": report.to_dict()}
    if cfg.data.heldout_path:
        heldout, held_report = load_sft_examples(cfg.data.heldout_path, tokenizer, **options)
        heldout = heldout[: cfg.data.heldout_max]
        reports["heldout"] = held_report.to_dict()
    else:
        train_set, heldout = split_heldout(train_set, cfg.data.heldout_fraction, cfg.data.heldout_max, ctx.seed)
    if not train_set:
        raise DataError(f"sft: no usable training examples in {source} ({report.summary()})")
    return train_set, heldout, reports


def check_teacher(cfg: SFTConfig, tokenizer) -> str | None:
    """The teacher of a kl / ce+kl loss (None for ce); its tokenizer must be the student's."""
    if cfg.loss == "ce":
        return None
    path = Path(cfg.teacher_path).expanduser()
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"sft.teacher_path={str(path)!r}: the teacher's tokenizer differs from the student's; "
                         "logit distillation needs one vocabulary (use loss: ce on the teacher's text instead)")
    return str(path)


def trainer_config(cfg: SFTConfig, ctx: StageContext) -> PolicyConfig:
    loss = SupervisedLoss(ce_weight=0.0 if cfg.loss == "kl" else 1.0,
                          kl_weight={"ce": 0.0, "kl": 1.0, "ce+kl": cfg.kl_weight}[cfg.loss],
                          kl_temperature=cfg.kl_temperature, mtp=cfg.mtp)
    return trainer_policy(cfg.optim, cfg.resources, cfg.parallelism, loss, cfg.micro_batch_size, ctx.seed,
                          Precision.from_section(ctx.recipe.get("model") or {}))


def finish(run: SupervisedRun, final: Path, state: dict, base: Path, data_report: dict, total_steps: int) -> dict:
    """The final model beside the checkpoints, plots and summary.json; the stage's outputs."""
    model_dir = run.stage_dir / "model"
    export_model(final, model_dir)
    plots = plot_metrics(run.stage_dir / "metrics.jsonl", run.stage_dir / "plots", SFT_PLOTS)
    summary = {
        "base_model": str(base), "family": model_type_of(base), "steps": total_steps, "workers": run.resources.trainer.workers,
        "train_loss": state.get("train_loss"), "val_loss_start": state.get("val_loss_start"),
        "val_loss_end": state.get("val_loss_end"), "tokens": state.get("tokens"),
        "optimizer_steps": state["step"], "trained_tokens": state.get("trained_tokens"),
        "wall_seconds": round(state.get("wall_seconds", 0.0), 1), "data": data_report,
    }
    (run.stage_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    losses = (f"validation loss {summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f}"
              if summary["val_loss_start"] is not None else f"train loss {summary['train_loss']:.4f}")
    print(f"sft: {losses} in {total_steps} steps, {summary['wall_seconds']:.0f}s")
    return {
        "model_path": str(model_dir),
        "summary_path": str(run.stage_dir / "summary.json"),
        "metrics_path": str(run.stage_dir / "metrics.jsonl"),
        "plots": [str(p) for p in plots],
        "val_loss_start": summary["val_loss_start"],
        "val_loss_end": summary["val_loss_end"],
        "steps": total_steps,
        **{key: summary[key] for key in ("optimizer_steps", "trained_tokens", "tokens")},
    }
