"""PolicyWorker: the trained model (and a frozen one: the KL reference or a teacher) on one data-parallel rank.

The trainer of every stage: the model is r1pipe's DeepSeek-V3 or any dense transformers causal LM
(r1pipe.causal_lm; config.json says which), and a step runs whichever loss the stage hands it: the
supervised loss (next-token CE + MTP, or forward KL to a teacher: `supervised_step`) for pretraining and
SFT, the GRPO family (`train_step`) for RL.

N workers split each batch by rows and join one torch.distributed group (gloo on CPU, NCCL on
GPU). With `fsdp` (the default) the policy and the reference are sharded per decoder block with
FSDP2 (r1pipe.workers.sharding), so each rank holds 1/N of the parameters and optimizer state and
gradients are reduce-scattered; without it every rank holds a replica and gradients are summed in
one flat all-reduce. Either way the loss is normalised with the *global* token / sequence counts,
so N workers step exactly like one worker on the whole batch. Every rank runs the same number of
micro-batches (`num_micro`), as the sharded forward and backward are collectives; a micro-batch holds
rows of similar length (sorted) and is padded only to its own longest row.
The class is plain Python; the controller wraps it with ray.remote, and it runs in-process without Ray.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from r1pipe.algo import draft_loss, grpo_loss, tis_weights, token_logprobs_and_entropy
from r1pipe.algo.sft import SupervisedLoss, TargetCounts, masked_ce_sum, supervised_loss
from r1pipe.causal_lm import compute_dtype, is_v3, load_model, run_model, save_model
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError
from r1pipe.workers.allocator import retain_freed_memory
from r1pipe.data.batch import TrainBatch, by_length
from r1pipe.workers.packing import by_prompt, pack_shared_prompts
from r1pipe.workers.sharding import (
    accumulate, apply_expert_parallel, checkpoint_activations, clip_grad_norm, checkpoint_bytes, expert_mesh, full_tensors, gathered_model,
    load_sharded, local_bytes, reduce_expert_gradients, reshard, save_sharded, shard, undo_gradient_average,
)
from r1pipe.workers.shared_memory import SharedBuckets, SharedGradients, make_directory, node_id, node_ip, unlink
from r1pipe.workers.weight_sync import FlatWeights, SyncGroup, free_port, rehome, rendezvous_address, tensor_meta


@dataclass
class PolicyConfig:
    """What a policy worker needs from the GRPO stage config."""

    lr: float = 1e-4
    weight_decay: float = 0.0  # on matrices only (parameters of 2+ dimensions), not norms and biases
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    supervised: SupervisedLoss = SupervisedLoss()  # the terms of supervised_step (pretraining, SFT)
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss: str = "grpo"  # the policy-gradient surrogate: grpo | gspo | cispo
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    norm_constant: float | None = None  # Dr. GRPO's constant; the generation budget
    temperature: float = 1.0
    micro_batch_size: int = 16
    bias_update_gamma: float | None = None  # None: the model config's gamma
    freeze_router_bias: bool = False  # hold the routers' balancing bias still (MaxVio is still measured)
    draft_loss: bool = False  # train the MTP module (only it) toward the policy's detached next-token distribution
    draft_lr_scale: float = 1.0  # with the draft loss, the MTP module's parameters step at lr x this
    draft_depth: int = 1  # drafts chained per position in the draft loss: the engine's speculative_k
    device: str = "cpu"
    num_threads: int = 1  # torch threads; 0: the worker's CPUs
    seed: int = 0
    precision: Any = None  # r1pipe.model.Precision from the recipe's model section; None: fp32, no FP8
    fsdp: bool = True  # shard policy and reference across the workers (FSDP2); False: replicas + all-reduce
    activation_checkpointing: bool = False  # recompute each block's attention in the backward
    fsdp_keep_gathered: bool = False  # gather once per step, not per micro-batch (sharding.accumulate)
    ep_size: int = 1  # r1pipe V3 with fsdp: routed experts split over groups of this many ranks (expert parallelism)
    share_prompts: bool = True  # rows with the same prompt run it once (r1pipe.workers.packing); not with draft_loss
    shared_memory: bool = True  # CPU replicas on one machine sum gradients in shared memory, not over gloo's TCP


class PolicyWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        cfg: PolicyConfig,
        frozen_path: str | None = None,
    ):
        """`model_path` is the stage's initial model; a resumed run then loads its checkpoint into it
        (load_checkpoint). `frozen_path`: a model held without gradients beside it, sharded like it: the
        GRPO KL reference (the initial policy) or the teacher of logit distillation; None: none."""
        if cfg.num_threads > 0:  # 0: as many as the worker's CPUs (Ray sets OMP_NUM_THREADS from them)
            torch.set_num_threads(cfg.num_threads)
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":  # activations live in host memory: reuse them, do not page-fault them in
            retain_freed_memory()
        torch.manual_seed(cfg.seed + rank)  # this rank's RNG stream (saved in checkpoints)
        # fp32 masters; bf16 compute (autocast), FP8 projections as the recipe's model section says
        self.model = load_model(model_path, cfg.precision, device=str(self.device))
        self.model.train()
        self.reference = None
        if frozen_path is not None:
            self.reference = load_model(frozen_path, cfg.precision, device=str(self.device))
            self.reference.eval().requires_grad_(False)
        if cfg.activation_checkpointing:
            checkpoint_activations(self.model)
        self.sharded = cfg.fsdp and world_size > 1
        self.mesh = None  # the (dp, ep) mesh of expert parallelism (cfg.ep_size > 1)
        self.sync_group = None
        self.flat_weights: FlatWeights | None = None  # a whole model's weights laid out as the sync buckets
        self.flat_grad: torch.Tensor | None = None  # replicas: every gradient is a view of it (_flat_gradients)
        self.shared_grads: SharedGradients | None = None
        # oneDNN compiles a bf16 kernel per matmul shape: round micro-batch widths so that shapes repeat
        bf16_cpu = self.device.type == "cpu" and compute_dtype(self.model) == torch.bfloat16
        self.width_multiple = 8 if bf16_cpu else 1
        # the draft loss reads the main model's hidden states row by row; packing is r1pipe V3's
        self.share_prompts = cfg.share_prompts and not cfg.draft_loss and is_v3(self.model)
        # what the engines take, read before sharding (an FSDP2 state_dict() is a collective)
        self.metas = [tensor_meta(n, t) for n, t in self.model.state_dict().items()]
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.draft_params = self._draft_parameters() if cfg.draft_loss else []
        drafter = {id(p) for p in self.draft_params}
        main = [p for p in self.model.parameters() if id(p) not in drafter]
        groups = []
        for params, scale in ((main, 1.0), (self.draft_params, cfg.draft_lr_scale)):  # the drafter chases a moving policy
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "lr": cfg.lr * scale, "lr_scale": scale,
                                   "weight_decay": cfg.weight_decay if decay else 0.0})
        # fused: one kernel over all parameters (CPU and CUDA), ~3x the per-tensor loop on the tiny model
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)

    def _set_lr(self, lr: float | None) -> None:
        """The step's learning rate (a schedule on the driver); None keeps the current one."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

    def init_distributed(self, init_method: str) -> None:
        """Join the process group (called on every rank at once, after all actors exist); with fsdp,
        shard the policy and the reference and rebuild the optimizer on the shards."""
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size)
        if self.sharded:
            models = [m for m in (self.model, self.reference) if m is not None]
            if self.cfg.ep_size > 1:
                self.mesh = expert_mesh(self.world_size, self.cfg.ep_size, self.device.type)
                for model in models:
                    apply_expert_parallel(model, self.mesh)
            for model in models:
                shard(model, self.cfg.fsdp_keep_gathered)
            self._build_optimizer()
        elif self.world_size > 1:
            self._flat_gradients()

    def _flat_gradients(self) -> None:
        """Replicas: every trainable parameter's gradient becomes a view of one flat buffer (autograd
        accumulates into it in place), so the all-reduce needs no packing. With cfg.shared_memory and every
        rank on this machine's CPUs, the buffer is this rank's slot of a SharedGradients region and the sum
        runs there; otherwise it is all-reduced by the process group."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len({p.dtype for p in params}) != 1:
            return  # mixed master dtypes: _all_reduce_grads packs per step
        numel, dtype = sum(p.numel() for p in params), params[0].dtype
        shared = None
        if self.cfg.shared_memory and self.device.type == "cpu":
            nodes: list[Any] = [None] * self.world_size
            dist.all_gather_object(nodes, node_id())
            if len(set(nodes)) == 1:
                box = [make_directory(self.world_size * numel * dtype.itemsize) if self.rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                if box[0] is not None:
                    shared = SharedGradients(box[0], numel, dtype, self.rank, self.world_size)
                    dist.barrier()  # every rank has mapped the region
                    if self.rank == 0:
                        unlink(box[0])
        self.shared_grads = shared
        self.flat_grad = shared.local if shared is not None else torch.zeros(numel, dtype=dtype, device=self.device)
        self.grad_views, offset = [], 0
        for p in params:
            self.grad_views.append((p, self.flat_grad[offset:offset + p.numel()].view_as(p)))
            offset += p.numel()
        self._attach_gradients()

    def _attach_gradients(self) -> None:
        """Point every parameter's gradient at its view of the flat buffer, keeping its value (a checkpoint
        load, or a gradient set from outside, replaces the tensor)."""
        for p, view in self.grad_views:
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view

    def memory(self) -> dict[str, int]:
        """Bytes of parameters and optimizer state this rank holds (its shards)."""
        return local_bytes(self.model, self.optimizer)

    def rendezvous_address(self) -> str:
        """tcp://this-node:free-port, for rank 0 to host the process group."""
        return rendezvous_address()

    def _draft_parameters(self) -> list[torch.nn.Parameter]:
        """The MTP module's own parameters (not the embedding and output head it shares)."""
        modules = getattr(self.model, "mtp_modules", [])
        if not modules:
            raise ConfigError("rl.algorithm.draft_loss needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        shared = {id(p) for p in self.model.model.embed_tokens.parameters()} | {id(p) for p in self.model.lm_head.parameters()}
        return [p for m in modules for p in m.parameters() if id(p) not in shared]

    # ---- forward passes ----

    def _forward_logprobs(self, model: torch.nn.Module, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(log-probs [B,S-1], entropy [B,S-1], the model output) of `batch` (on this device). With
        share_prompts, rows of the same prompt run packed (the prompt once) and the log-probs and entropy
        are those of the completion tokens (0 elsewhere: nothing reads them); the output is then None."""
        if self.share_prompts:
            packed = pack_shared_prompts(batch, self.width_multiple)
            out = model(packed.input_ids, positions=packed.positions, attention_mask=packed.token_weight,
                        prefix=packed.prefix, routing=packed.routing)
            logits = out.logits.view(-1, out.logits.shape[-1]).index_select(0, packed.source)
            logp, entropy = token_logprobs_and_entropy(logits, packed.target, self.cfg.temperature)
            return packed.unpack(logp), packed.unpack(entropy), None
        replay = {} if batch.routing is None else {"routing": batch.routing}
        out = run_model(model, batch.input_ids, batch.attention_mask, **replay)
        logits = out.logits[:, :-1]
        return (*token_logprobs_and_entropy(logits, batch.input_ids[:, 1:], self.cfg.temperature), out)

    def _draft_loss(self, batch: TrainBatch, out: Any, num_positions: float) -> torch.Tensor:
        """The drafter chained `draft_depth` deep as the engine drafts (`mtp_draft_chain`): depth j at
        position t reads token t+j and drafts token t+j+1; its target is the policy's distribution at t+j
        (detached), on positions whose drafted token is a completion token. Mean over the depths. Its
        gradient reaches the MTP module's own parameters only (the main model's hidden states, the shared
        embedding and head enter detached), so it joins the GRPO loss's backward, sharded or not."""
        S = batch.input_ids.shape[1]
        depth = self.cfg.draft_depth
        chain = self.model.mtp_draft_chain(out.hidden.detach(), batch.input_ids, depth, batch.attention_mask,
                                           detach_shared=True)
        losses = [draft_loss(logits[:, : S - 1 - j], out.logits[:, j : S - 1], batch.response_mask[:, j:],
                             self.cfg.temperature, num_positions)
                  for j, logits in enumerate(chain, start=1)]
        return sum(losses) / depth

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        if self.device.type == "cpu":
            return batch
        routing = None if batch.routing is None else [r.to(self.device) for r in batch.routing]
        return TrainBatch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.response_mask.to(self.device), routing)

    def _micro_batches(self, batch: TrainBatch, num_micro: int | None) -> list[torch.Tensor]:
        """This rank's micro-batches as row indices: rows sorted by length (longest first; with share_prompts,
        the rows of each prompt together, groups with the most tokens first) and cut into micro_batch_size
        rows, or exactly `num_micro` near-equal parts (some may be empty) so that every rank runs the same number. Each one is then trimmed to its longest row, so a batch of mixed
        completion lengths is not padded to the longest of all (same update: the loss is a sum over
        tokens normalised by the global counts). No rows at all: one empty micro-batch (an idle pass, so
        the parameters get their zero gradients and AdamW steps them as after any zero-gradient batch)."""
        order, n = (by_prompt(batch) if self.share_prompts else by_length(batch)), len(batch)
        if num_micro is None:
            return [order[i:i + self.cfg.micro_batch_size] for i in range(0, max(n, 1), self.cfg.micro_batch_size)]
        bounds = [round(i * n / num_micro) for i in range(num_micro + 1)]
        return [order[bounds[i]:bounds[i + 1]] for i in range(num_micro)]

    def _idle_pass(self, model: torch.nn.Module, backward: bool, mtp: bool = False) -> None:
        """A rank with no rows for this micro-batch still joins the sharded collectives: a one-token
        forward in eval mode (no expert loads counted) through the modules the other ranks run (the MTP
        modules with `mtp`: under expert parallelism each MoE layer is a collective) and a zero backward
        (through the drafter too with the draft loss, as the other ranks' backward reaches it)."""
        was_training = model.training
        model.eval()
        try:
            with torch.set_grad_enabled(backward):
                ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                out = run_model(model, ids, mtp=mtp)
                if backward:
                    zero = out.logits.sum() * 0.0 + sum(m.sum() * 0.0 for m in (out.mtp_logits or []))
                    if self.draft_params:  # FSDP reduces the gradients a backward made: the MTP module's too
                        chain = model.mtp_draft_chain(out.hidden.detach(), ids, 1, detach_shared=True)
                        zero = zero + chain[0].sum() * 0.0
                    zero.backward()
        finally:
            model.train(was_training)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, reference: bool = False, num_micro: int | None = None) -> torch.Tensor:
        """Log-probs [B, S-1] of the completion tokens (response_mask > 0; 0 elsewhere) under the policy (or the
        reference), in eval mode so that the forward does not count toward the router's expert loads."""
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("this worker holds no reference model (kl_coef == 0)")
        was_training = model.training
        model.eval()
        out = torch.zeros(len(batch), batch.input_ids.shape[1] - 1)
        try:
            for rows in self._micro_batches(batch, num_micro):
                if len(rows) == 0:
                    self._idle_pass(model, backward=False)
                    continue
                micro = batch.rows(rows).trimmed(self.width_multiple)
                logp = self._forward_logprobs(model, self._to_device(micro))[0].cpu()
                out[rows, : logp.shape[1]] = logp * (micro.response_mask > 0)  # 0 off the completion tokens
        finally:
            model.train(was_training)
            if self.sharded:  # a forward alone leaves the root unit (and with keep_gathered every block) gathered
                reshard(model)
        return out

    # ---- one optimizer step ----

    def train_step(
        self,
        batch: TrainBatch,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        ref_logp: torch.Tensor | None,
        num_tokens: float,
        num_seqs: float,
        tis_weight: torch.Tensor | None = None,
        num_draft_positions: float = 0.0,
        num_micro: int | None = None,
        engine_logp: torch.Tensor | None = None,
        tis_cap: float | None = None,
        lr: float | None = None,
    ) -> dict[str, float]:
        """One optimizer step on this rank's rows (in `num_micro` micro-batches when given); `num_tokens`/
        `num_seqs` (and `num_draft_positions` for the draft loss) count the whole global mini-batch.

        `old_logp` None: the batch gets exactly this one update, so the old log-probs are this forward's
        own, detached (no separate forward). `engine_logp` [B,S-1] (the rollout engine's): the step also
        sums |old - engine| (mismatch_abs, mismatch_max) and, with `tis_cap`, re-weights the policy
        gradient by min(pi_old / pi_engine, tis_cap) (truncated importance sampling; tis_clipped and
        tis_weight sums); or `tis_weight` [B,S-1] gives those weights directly. Returns token sums (see
        grpo_loss) plus entropy, loss, draft_loss, grad_norm, maxvio."""
        if tis_cap is not None and (engine_logp is None or tis_weight is not None):
            raise ValueError("tis_cap needs engine_logp and no tis_weight")
        cfg = self.cfg
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=False)
        totals: dict[str, float] = {"entropy": 0.0, "loss": 0.0}
        micro_batches = self._micro_batches(batch, num_micro)
        for i, rows in enumerate(micro_batches):
            if self.sharded and cfg.fsdp_keep_gathered:
                accumulate(self.model, last_micro_batch=i == len(micro_batches) - 1)
            if len(rows) == 0:
                self._idle_pass(self.model, backward=True)
                continue
            micro = self._to_device(batch.rows(rows).trimmed(self.width_multiple))
            logp, entropy, out = self._forward_logprobs(self.model, micro)
            mask = micro.response_mask
            T = mask.shape[1]
            old = logp.detach() if old_logp is None else old_logp[rows, :T].to(self.device)
            tis = None if tis_weight is None else tis_weight[rows, :T].to(self.device)
            if engine_logp is not None:
                engine, on = engine_logp[rows, :T].to(self.device), mask > 0
                gap = (old - engine).abs()[on]
                totals["mismatch_abs"] = totals.get("mismatch_abs", 0.0) + float(gap.sum())
                totals["mismatch_max"] = max(totals.get("mismatch_max", 0.0), float(gap.max()) if gap.numel() else 0.0)
                if tis_cap is not None:
                    tis, capped = tis_weights(old, engine, tis_cap)
                    totals["tis_clipped"] = totals.get("tis_clipped", 0.0) + float(capped[on].sum())
                    totals["tis_weight"] = totals.get("tis_weight", 0.0) + float(tis[on].sum())
            loss, stats = grpo_loss(
                logp,
                old,
                advantages[rows].to(self.device),
                mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                agg=cfg.loss_agg,
                ref_logp=None if ref_logp is None else ref_logp[rows, :T].to(self.device),
                kl_coef=cfg.kl_coef,
                num_tokens=num_tokens,
                num_seqs=num_seqs,
                norm_constant=cfg.norm_constant,
                tis_weight=tis,
                surrogate=cfg.loss,
            )
            total = loss
            if self.draft_params:  # the draft loss reaches only the MTP module's own parameters
                d_loss = self._draft_loss(micro, out, num_draft_positions)
                total = loss + d_loss
                totals["draft_loss"] = totals.get("draft_loss", 0.0) + float(d_loss.detach())
            total.backward()
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float((entropy.detach() * (mask > 0)).sum())
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        totals.update(self._optimizer_step())
        return totals

    def _optimizer_step(self) -> dict[str, float]:
        """Sum the gradients over ranks, clip, step AdamW, then nudge the routers' balancing bias (V3):
        {grad_norm, maxvio}."""
        cfg = self.cfg
        if self.sharded:  # FSDP has reduce-scattered (averaged) them already
            undo_gradient_average(self.model, self.world_size)
            if self.mesh is not None:
                reduce_expert_gradients(self.model, self.mesh)
        else:
            self._all_reduce_grads()
        drafter = {id(p) for p in self.draft_params}
        grad_norm = clip_grad_norm([p for p in self.model.parameters() if id(p) not in drafter], cfg.grad_clip)
        if self.draft_params:
            clip_grad_norm(self.draft_params, cfg.grad_clip)
        self.optimizer.step()
        maxvio = self._update_router_bias()
        return {"grad_norm": float(grad_norm), "maxvio": max(maxvio) if maxvio else 0.0}

    # ---- supervised steps: pretraining, SFT, logit distillation ----

    def mtp_depth(self) -> int:
        """MTP modules the supervised loss trains (0 for dense models or with supervised.mtp off)."""
        if not (self.cfg.supervised.mtp and is_v3(self.model)):
            return 0
        return int(self.model.config.num_nextn_predict_layers)

    def supervised_step(self, batch: TrainBatch, counts: TargetCounts, num_micro: int | None = None,
                        lr: float | None = None) -> dict[str, float]:
        """One optimizer step of the supervised loss (cfg.supervised: CE + MTP, KL to the frozen teacher) on this
        rank's rows; `counts` are the whole step's target counts, so N ranks step like one. Returns this rank's
        sums of each term's share (ce, kl, mtp, loss), its target and token counts, grad_norm and maxvio."""
        self._set_lr(lr)
        spec, depth = self.cfg.supervised, self.mtp_depth()
        mtp_lambda = float(getattr(self.model.config, "mtp_lambda", 0.0) or 0.0) if depth else 0.0
        self.optimizer.zero_grad(set_to_none=False)
        totals: dict[str, float] = {"loss": 0.0, "targets": 0.0, "tokens": 0.0}
        micro_batches = self._micro_batches(batch, num_micro)
        for i, rows in enumerate(micro_batches):
            if self.sharded and self.cfg.fsdp_keep_gathered:
                accumulate(self.model, last_micro_batch=i == len(micro_batches) - 1)
            if len(rows) == 0:
                self._idle_pass(self.model, backward=True, mtp=depth > 0)
                continue
            micro = self._to_device(batch.rows(rows).trimmed(self.width_multiple))
            out = run_model(self.model, micro.input_ids, micro.attention_mask, mtp=depth > 0)
            teacher = None
            if spec.kl_weight:
                with torch.no_grad():
                    teacher = run_model(self.reference, micro.input_ids, micro.attention_mask).logits
            target_mask = micro.target_mask
            loss, stats = supervised_loss(out.logits, list(out.mtp_logits)[:depth], micro.input_ids, target_mask, counts,
                                          spec, mtp_lambda, teacher)
            if out.aux_loss is not None and out.aux_loss.requires_grad:  # V3's sequence-wise balance loss, per row
                loss = loss + out.aux_loss * len(rows) / max(len(batch), 1)
            loss.backward()
            totals["loss"] += float(loss.detach())
            totals["targets"] += float(target_mask[:, 1:].sum())
            totals["tokens"] += float(micro.attention_mask.sum())
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        totals.update(self._optimizer_step())
        return totals

    @torch.no_grad()
    def eval_loss(self, batch: TrainBatch, num_micro: int | None = None) -> tuple[float, float]:
        """(sum of next-token CE over the targets of this rank's rows, their number), in eval mode (the
        forward counts no expert loads): a validation loss is the sum over ranks over the count."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0.0
        try:
            for rows in self._micro_batches(batch, num_micro):
                if len(rows) == 0:
                    self._idle_pass(self.model, backward=False)
                    continue
                micro = self._to_device(batch.rows(rows).trimmed(self.width_multiple))
                out = run_model(self.model, micro.input_ids, micro.attention_mask)
                ce, n = masked_ce_sum(out.logits, micro.input_ids, micro.target_mask)
                total, count = total + float(ce), count + float(n)
        finally:
            self.model.train(was_training)
            if self.sharded:
                reshard(self.model)
        return total, count

    def _all_reduce_grads(self) -> None:
        """Sum gradients over ranks in one flat buffer (the loss already divides by global counts)."""
        if self.world_size == 1:
            return
        if self.flat_grad is not None:
            self._attach_gradients()
            if self.shared_grads is not None:
                self.shared_grads.all_reduce()
            else:
                dist.all_reduce(self.flat_grad, op=dist.ReduceOp.SUM)
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _update_router_bias(self) -> list[float]:
        """Auxiliary-loss-free balancing after the optimizer step. With several ranks the expert
        loads are summed first, so every replica nudges its biases identically."""
        if not hasattr(self.model, "update_router_bias"):
            return []
        if self.world_size > 1:  # one collective for all layers
            loads = self._expert_load_tensors()
            if loads:
                flat = torch.cat(loads)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for load, summed in zip(loads, flat.split([t.numel() for t in loads])):
                    load.copy_(summed)
        gamma = 0.0 if self.cfg.freeze_router_bias else self.cfg.bias_update_gamma  # gamma 0: measure, do not move
        return [float(v) for v in self.model.update_router_bias(gamma)]

    def _expert_load_tensors(self) -> list[torch.Tensor]:
        """The models' accumulated per-expert load buffers (in place), found by name."""
        return [b for name, b in self.model.named_buffers() if name.endswith("expert_load")]

    # ---- weights and checkpoints ----

    def weight_metas(self) -> list:
        """Name, full shape and dtype of every weight the engines take (no tensors)."""
        return self.metas

    def sync_address(self) -> tuple[str, int]:
        """(host, free port) for the weight-sync group's store, on this (rank 0's) node."""
        return node_ip(), free_port()

    def join_sync(self, host: str, port: int, world_size: int, buckets: list) -> None:
        """Rank 0 joins the trainer -> engines group as its sender (rank 0 there); syncs follow `buckets`."""
        if self.rank == 0:
            self.sync_group = SyncGroup(host, port, 0, world_size, buckets, str(self.device))

    def share_buckets(self) -> str | None:
        """Rank 0: put the sync buckets in shared memory for engines on this machine; returns their directory
        (None without /dev/shm or room in it: the broadcast carries the weights)."""
        buckets = self.sync_group.buckets
        directory = make_directory(sum(m.numel * m.torch_dtype.itemsize for bucket in buckets for m in bucket))
        if directory is not None:
            self.sync_group.shared = SharedBuckets(directory, buckets)
        return directory

    def unlink_shared(self, directory: str) -> None:
        unlink(directory)

    def send_weights(self) -> None:
        """Rank 0 sends the weights to the engines bucket by bucket. A whole model keeps them laid out as the
        buckets (weight_sync.rehome, done once); a sharded one is gathered one tensor at a time, which
        every rank joins."""
        if self.rank == 0 and self.sync_group is None:
            raise RuntimeError("send_weights before join_sync")
        if not self.sharded:
            if self.rank == 0:
                self.sync_group.send_flat(self._flat_weights(self.sync_group.buckets))
            return
        named = full_tensors(self.model)
        if self.rank == 0:
            self.sync_group.send(named)
        else:
            for _ in named:
                pass

    def _flat_weights(self, buckets: list) -> FlatWeights:
        """The model's weights in flat buffers laid out as `buckets`: the shared buckets themselves when the
        engines map them (a sync then copies nothing here), else private ones. Moved there on first use, and
        again if something has replaced a parameter's storage since."""
        if self.flat_weights is None or not self.flat_weights.fits(buckets):
            shared = self.sync_group.shared if self.sync_group is not None else None
            self.flat_weights = rehome(self.model, buckets, None if shared is None else shared.tensors)
        return self.flat_weights

    def checkpoint_bytes(self) -> int:
        """Bytes this rank writes in save_checkpoint, about: on rank 0 the whole model in the Hugging Face
        layout; its RNG state; its DCP shards of the model and of the AdamW state (sharding.checkpoint_bytes;
        replicas' identical entries are written once, counted here on rank 0)."""
        hf = sum(m.numel * m.torch_dtype.itemsize for m in self.metas) if self.rank == 0 else 0
        rng = 16 * 2**10  # rng_rank{rank}.pt
        return hf + rng + (checkpoint_bytes(self.model) if self.sharded or self.rank == 0 else 0)

    def save_checkpoint(self, path: str, tokenizer_dir: str | None = None) -> None:
        """Rank 0 writes the whole model in the Hugging Face layout (gathered from the shards); every
        rank writes its shards of model and optimizer (DCP, under sharded/) and its RNG state. A write
        that fails on one rank (a full disk) raises on every rank, so none is left waiting for it."""
        path_ = Path(path)
        path_.mkdir(parents=True, exist_ok=True)
        whole = gathered_model(self.model) if self.sharded else self.model

        def model_files() -> None:
            if self.rank == 0:
                save_model(whole, path_)
                if tokenizer_dir is not None:
                    load_tokenizer(tokenizer_dir).save_pretrained(path_)

        try:
            self._on_every_rank(model_files)
        finally:
            del whole
        save_sharded(path_ / "sharded", self.model, self.optimizer)  # DCP raises on every rank itself
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        self._on_every_rank(lambda: torch.save(rng, path_ / f"rng_rank{self.rank}.pt"))

    def _on_every_rank(self, write: Callable[[], None]) -> None:
        """Run `write()` here, then tell every rank whether all succeeded: a rank whose own write failed
        raises its error, the others a RuntimeError quoting the first failed rank's."""
        error = None
        try:
            write()
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
        if self.world_size > 1:
            errors: list[str | None] = [None] * self.world_size
            dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
            failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
            if error is None and failed:
                raise RuntimeError(f"policy rank {failed[0][0]} could not write its part of the checkpoint: {failed[0][1]}")
        if error is not None:
            raise error

    def load_checkpoint(self, path: str) -> None:
        """Model and optimizer from the checkpoint's DCP shards, written by any number of workers: the
        optimizer's state is exactly the checkpoint's (sharding.load_sharded)."""
        path_ = Path(path)
        load_sharded(path_ / "sharded", self.model, self.optimizer)
        # AdamW steps a parameter once it has a gradient buffer (zero_grad keeps them as zeros): give
        # one to every parameter the optimizer has stepped, as the uninterrupted run has
        for p in self.model.parameters():
            if self.optimizer.state.get(p) and p.grad is None:
                p.grad = torch.zeros_like(p)
        rng_file = path_ / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this worker runs on (the host name outside Ray)."""
        return node_id()
