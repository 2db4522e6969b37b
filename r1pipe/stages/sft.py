"""Stage `sft`: supervised fine-tuning of r1pipe's DeepSeek-V3 or a Hugging Face causal LM.

Data comes through the data layer (r1pipe.data): prompt/response rows rendered with the recipe's
template, or chat rows (`messages`) through the tokenizer's chat template (else the R1 format);
the loss is next-token cross-entropy on assistant tokens only (prompt and padding masked).
Batches are length-grouped: each optimizer step's sequences are sorted by length and cut into
micro-batches (gradient accumulation), and the loss is normalised by the step's whole target
count, so the update equals one big batch's. Steps draw from a fresh seeded permutation per epoch,
so the step number is the whole data position: a run killed at any point (SIGKILL included) and
started again continues from its newest checkpoint (model, optimizer, RNG) to the same weights.

Precision follows the recipe's model section: `model.dtype: bfloat16` computes under autocast over
fp32 master weights and optimizer state; `model.fp8` (r1pipe V3 only) computes the projections in
block-scaled FP8 (`model.fp8_exclude` leaves modules out).

Outputs: model_path (final weights + tokenizer, Hugging Face layout: loads in r1pipe for V3 and in
transformers for dense models), metrics (loss, validation loss, learning rate, grad norm,
tokens/s) in metrics.jsonl + TensorBoard + PNG plots.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1pipe.algo.schedule import scheduled_lr
from r1pipe.algo.sft import forward_kl_sum, masked_ce_sum
from r1pipe.causal_lm import CausalLM, load_causal_lm
from r1pipe.data import SFTExample, load_sft_examples
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError, DataError, ModelError
from r1pipe.model.precision import Precision
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import SFTConfig
from r1pipe.tracking import MetricsLogger, StepProgress, plot_metrics
from r1pipe.tracking.checkpoints import (
    atomic_write, check_room_for_checkpoints, latest_checkpoint, tree_bytes, write_checkpoint,
)
from r1pipe.workers.sharding import checkpoint_bytes

SFT_PLOTS = {
    "loss": ("SFT loss (assistant tokens)", ["loss", "ce", "kl", "val_loss"]),
    "lr": ("learning rate", ["lr"]),
    "throughput": ("tokens/s (trained tokens)", ["tokens_per_second"]),
}


# ---------------------------------------------------------------- batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B,S] right-padded
    attention_mask: torch.Tensor  # [B,S] 1 on real tokens
    target_mask: torch.Tensor  # [B,S] True on trained tokens

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: list[SFTExample], pad_id: int) -> MicroBatch:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        attention[row, : len(e)] = 1
        targets[row, : len(e)] = torch.tensor(e.target_mask)
    return MicroBatch(ids, attention, targets)


class StepPlan:
    """Which examples each optimizer step trains on: epoch e is a permutation seeded by (seed, e);
    step j of an epoch takes the next batch_size of it, sorted by length, cut into micro-batches."""

    def __init__(self, examples: list[SFTExample], batch_size: int, micro_batch_size: int, seed: int):
        self.examples, self.batch_size, self.micro, self.seed = examples, batch_size, micro_batch_size, seed
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch, self._order = -1, list(range(len(examples)))

    def step(self, step: int) -> list[list[SFTExample]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        chosen = sorted((self.examples[i] for i in self._order[j * self.batch_size:(j + 1) * self.batch_size]),
                        key=len, reverse=True)
        return [chosen[k:k + self.micro] for k in range(0, len(chosen), self.micro)]


def split_heldout(examples: list[SFTExample], fraction: float, limit: int, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, held-out): a seeded random `fraction` (at most `limit`) set aside."""
    n = min(limit, round(len(examples) * fraction)) if len(examples) > 1 else 0
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------- the trainer


def run_sft(cfg: SFTConfig, ctx: StageContext) -> dict:
    return SFTTrainer(cfg, ctx).run()


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.stage_dir = Path(ctx.stage_dir)
        self.ckpt_root = self.stage_dir / "checkpoints"
        self.device = torch.device(cfg.resources.device)

    # ---- setup

    def start_model(self) -> Path:
        path = Path(self.cfg.model_path).expanduser() if self.cfg.model_path else self.ctx.model_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"sft: model {path} has no config.json (a Hugging Face layout checkpoint is expected)")
        return path

    def load_data(self, tokenizer, max_length: int) -> tuple[list[SFTExample], list[SFTExample], dict]:
        cfg = self.cfg
        source = cfg.data.train_path or self.ctx.output("sft_path")
        if not source:
            raise ConfigError("sft: no training data: set train_path (a file, a save_to_disk directory or a hub name) "
                             "or run a stage that outputs sft_path")
        fields = {"prompt": cfg.data.prompt_field, "response": cfg.data.response_field, "messages": cfg.data.messages_field, "id": cfg.data.id_field}
        options = dict(fields=fields, template=cfg.data.template, max_length=max_length, option_prefix="sft.data.")
        train, report = load_sft_examples(str(source), tokenizer, split=cfg.data.split, **options)
        reports = {"train": report.to_dict()}
        if cfg.data.heldout_path:
            heldout, held_report = load_sft_examples(cfg.data.heldout_path, tokenizer, **options)
            heldout = heldout[: cfg.data.heldout_max]
            reports["heldout"] = held_report.to_dict()
        else:
            train, heldout = split_heldout(train, cfg.data.heldout_fraction, cfg.data.heldout_max, self.ctx.seed)
        if not train:
            raise DataError(f"sft: no usable training examples in {source} ({report.summary()})")
        return train, heldout, reports

    # ---- steps

    def train_step(self, lm: CausalLM, optimizer: torch.optim.Optimizer, micro_batches: list[list[SFTExample]],
                   pad_id: int, teacher: CausalLM | None = None) -> dict[str, float]:
        """One optimizer step over the micro-batches; the loss is normalised by the step's targets."""
        cfg = self.cfg
        ce_weight = 0.0 if cfg.loss == "kl" else 1.0
        kl_weight = {"ce": 0.0, "kl": 1.0, "ce+kl": cfg.kl_weight}[cfg.loss]
        batches = [collate(m, pad_id) for m in micro_batches]
        use_mtp = self.cfg.mtp and lm.is_v3 and lm.module.config.num_nextn_predict_layers > 0
        n_mtp = lm.module.config.num_nextn_predict_layers if use_mtp else 0
        counts = [sum(float(b.target_mask[:, shift:].sum()) for b in batches) for shift in range(1, 2 + n_mtp)]
        mtp_lambda = float(getattr(lm.module.config, "mtp_lambda", 0.0) or 0.0) if use_mtp else 0.0
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        tokens = 0
        for b in batches:
            ids, attention, targets = b.input_ids.to(self.device), b.attention_mask.to(self.device), b.target_mask.to(self.device)
            logits, mtp_logits = lm.forward(ids, attention, mtp=use_mtp)
            ce, _ = masked_ce_sum(logits, ids, targets)
            ce = ce / max(counts[0], 1.0)
            loss = ce_weight * ce
            if kl_weight:
                with torch.no_grad():
                    teacher_logits, _ = teacher.forward(ids, attention)
                kl, _ = forward_kl_sum(logits, teacher_logits, targets, cfg.kl_temperature)
                kl = kl / max(counts[0], 1.0)
                loss = loss + kl_weight * kl
                sums["kl"] += float(kl.detach())
            for k, extra in enumerate(mtp_logits):
                mtp_ce, _ = masked_ce_sum(extra, ids, targets, shift=k + 2)
                loss = loss + mtp_lambda / n_mtp * mtp_ce / max(counts[k + 1], 1.0)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(ce.detach())
            tokens += b.tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.module.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm.after_optimizer_step()
        if not kl_weight:
            sums.pop("kl")
        return {**sums, "grad_norm": float(grad_norm), "tokens": tokens, "targets": counts[0]}

    @torch.no_grad()
    def validation_loss(self, lm: CausalLM, examples: list[SFTExample], pad_id: int) -> float | None:
        """Token-weighted mean CE on the held-out examples' assistant tokens (None without any)."""
        if not examples:
            return None
        lm.module.eval()
        ordered = sorted(examples, key=len, reverse=True)
        total, count = 0.0, 0.0
        for k in range(0, len(ordered), self.cfg.micro_batch_size):
            b = collate(ordered[k:k + self.cfg.micro_batch_size], pad_id)
            ids = b.input_ids.to(self.device)
            logits, _ = lm.forward(ids, b.attention_mask.to(self.device))
            ce, n = masked_ce_sum(logits, ids, b.target_mask.to(self.device))
            total, count = total + float(ce), count + float(n)
        lm.module.train()
        return total / max(count, 1.0)

    def save_checkpoint(self, lm: CausalLM, optimizer: torch.optim.Optimizer, tokenizer, step: int, state: dict) -> None:
        """Model, tokenizer, optimizer and RNG, written atomically after a free-space check (DiskFullError)."""
        def write(staging: Path) -> None:
            lm.save(staging)
            tokenizer.save_pretrained(str(staging))
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, staging / "trainer.pt")

        write_checkpoint(self.ckpt_root, step, write, state, keep=self.cfg.checkpoint.keep,
                         need_bytes=checkpoint_bytes(lm.module))

    # ---- the loop

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.resources.trainer.threads > 0:
            torch.set_num_threads(cfg.resources.trainer.threads)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        base = self.start_model()
        tokenizer = load_tokenizer(base)
        resume = latest_checkpoint(self.ckpt_root)
        precision = Precision.from_section(self.ctx.recipe.get("model") or {})
        lm = load_causal_lm(resume[0] if resume else base, precision, device=cfg.resources.device)
        max_length = cfg.data.max_length or lm.max_length
        train, heldout, data_report = self.load_data(tokenizer, max_length)
        teacher = self.load_teacher(tokenizer, precision)
        plan = StepPlan(train, cfg.batch_size, cfg.micro_batch_size, self.ctx.seed)
        if len(train) < cfg.batch_size:
            print(f"sft: warning: {len(train)} training example{'s' if len(train) != 1 else ''} for "
                  f"sft.batch_size={cfg.batch_size}: every step trains on the whole set (an epoch per step, "
                  f"repeated {cfg.steps or cfg.epochs}x)", file=sys.stderr)
        total_steps = cfg.steps or cfg.epochs * plan.steps_per_epoch
        optimizer = self.new_optimizer(lm)
        state = {"step": 0, "tokens": 0, "wall_seconds": 0.0, "val_loss_start": None}
        if resume is not None:
            state = resume[1]
            saved = torch.load(resume[0] / "trainer.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            random.setstate(saved["python_rng"])
            print(f"sft: resuming after step {state['step']} from {resume[0]}")
        print(f"sft: {lm.family} model from {base}; {len(train)} train / {len(heldout)} held-out examples; "
              f"{total_steps} steps of {cfg.batch_size} sequences ({plan.steps_per_epoch} steps per epoch)")

        # a run that cannot write its checkpoints stops before it trains, not at a later save
        saves = [s for s in range(state["step"] + 1, total_steps + 1) if s % cfg.checkpoint.every == 0 or s == total_steps]
        check_room_for_checkpoints(self.ckpt_root, checkpoint_bytes(lm.module), len(saves), cfg.checkpoint.keep)
        lm.module.train()
        step = state["step"]
        logger = MetricsLogger(self.stage_dir, resume_step=step)
        if state["val_loss_start"] is None:
            state["val_loss_start"] = self.validation_loss(lm, heldout, tokenizer.pad_token_id)
            if state["val_loss_start"] is not None:
                logger.log(0, {"val_loss": state["val_loss_start"]})
        t_start = time.perf_counter() - state["wall_seconds"]
        val_loss = state["val_loss_start"]
        with StepProgress(total_steps, step, "sft", show=("loss", "val_loss", "tokens_per_second")) as progress:
            while step < total_steps:
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(cfg.optim.schedule, step, total_steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio)
                metrics = self.train_step(lm, optimizer, plan.step(step), tokenizer.pad_token_id, teacher)
                step += 1
                state["tokens"] += metrics["tokens"]
                metrics.update(lr=optimizer.param_groups[0]["lr"], epoch=step / plan.steps_per_epoch,
                               tokens_per_second=metrics["tokens"] / max(time.perf_counter() - t0, 1e-9))
                if heldout and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    metrics["val_loss"] = val_loss = self.validation_loss(lm, heldout, tokenizer.pad_token_id)
                logger.log(step, metrics)
                progress.advance(metrics)
                if step % cfg.checkpoint.every == 0 or step == total_steps:
                    state.update(step=step, wall_seconds=time.perf_counter() - t_start, val_loss_end=val_loss,
                                 train_loss=metrics["loss"])
                    self.save_checkpoint(lm, optimizer, tokenizer, step, state)
        logger.close()
        return self.finish(lm, tokenizer, state, base, data_report, total_steps)

    def load_teacher(self, tokenizer, precision: Precision) -> CausalLM | None:
        """The frozen teacher of a kl / ce+kl loss; its tokenizer must be the student's."""
        if self.cfg.loss == "ce":
            return None
        path = Path(self.cfg.teacher_path).expanduser()
        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"sft.teacher_path={str(path)!r}: the teacher's tokenizer differs from the student's; "
                             "logit distillation needs one vocabulary (use loss: ce on the teacher's text instead)")
        teacher = load_causal_lm(path, Precision(dtype=precision.dtype), device=self.cfg.resources.device)
        teacher.module.eval().requires_grad_(False)
        return teacher

    def new_optimizer(self, lm: CausalLM) -> torch.optim.Optimizer:
        params = [p for p in lm.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.optim.lr, betas=tuple(self.cfg.optim.betas), eps=1e-8)

    def finish(self, lm: CausalLM, tokenizer, state: dict, base: Path, data_report: dict, total_steps: int) -> dict:
        """The final model beside the checkpoints, plots and summary.json; the stage's outputs."""
        final = latest_checkpoint(self.ckpt_root)
        assert final is not None and final[1]["step"] == total_steps, "sft finished without its last checkpoint"
        model_dir = self.stage_dir / "model"
        with atomic_write(model_dir, tree_bytes(final[0]) - tree_bytes(final[0] / "trainer.pt")) as tmp:
            shutil.copytree(final[0], tmp, ignore=shutil.ignore_patterns("trainer.pt", "trainer_state.json"))
        plots = plot_metrics(self.stage_dir / "metrics.jsonl", self.stage_dir / "plots", SFT_PLOTS)
        summary = {
            "base_model": str(base), "family": lm.family, "steps": total_steps,
            "train_loss": final[1].get("train_loss"), "val_loss_start": state["val_loss_start"],
            "val_loss_end": final[1].get("val_loss_end"), "tokens": final[1].get("tokens"),
            "wall_seconds": round(final[1].get("wall_seconds", 0.0), 1), "data": data_report,
        }
        (self.stage_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        losses = (f"validation loss {summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f}"
                  if summary["val_loss_start"] is not None else f"train loss {summary['train_loss']:.4f}")
        print(f"sft: {losses} in {total_steps} steps, {summary['wall_seconds']:.0f}s")
        return {
            "model_path": str(model_dir),
            "summary_path": str(self.stage_dir / "summary.json"),
            "metrics_path": str(self.stage_dir / "metrics.jsonl"),
            "plots": [str(p) for p in plots],
            "val_loss_start": summary["val_loss_start"],
            "val_loss_end": summary["val_loss_end"],
            "steps": total_steps,
        }
