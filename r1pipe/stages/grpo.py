"""Stage `grpo`: GRPO with a single Ray controller (HybridFlow-style).

A step reads top to bottom (GRPOTrainer.step): `collect` has the rollout engines (a GenerationGroup) sample a group of
completions per prompt and `score`s them on the RewardPool (refilling groups dropped by dynamic
sampling) into a RolloutBatch; `train` computes group-relative advantages, the trainer's old (and
reference) log-probs, optional TIS weights against the engine's log-probs, and runs the update(s)
on the PolicyGroup (plus the MTP draft loss when the engine speculates); `sync` pushes the new
weights to the engines; `checkpoint` saves model, optimizer, RNG and data position. Re-entering the
stage continues after the newest checkpoint, so a SIGKILLed run neither loses nor repeats a step;
the KL reference is always the stage's initial policy, never the checkpoint being resumed.

With rl.rollout.max_staleness 1 the next step's first round of rollouts is sampled while the trainer trains;
with rl.rollout.partial_rollouts the sync then lands in the middle of that generation, and each token records
the policy version that sampled it (Completion.token_versions).

Sampling is from the full tempered distribution: top_p < 1 is refused, because the trainer's (and
the engine's) log-probs are of the untruncated distribution, so a truncated behaviour policy would
make every importance ratio silently off-policy.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from r1pipe.algo import compute_advantages, dynamic_sampling_keep, overlong_filter_mask, overlong_soft_penalty
from r1pipe.data import load_prompt_rows
from r1pipe.data.jsonl import write_jsonl
from r1pipe.algo.schedule import scheduled_lr
from r1pipe.causal_lm import V3, check_expert_parallel, model_config
from r1pipe.data.batch import epoch_order
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.engine import check_supported
from r1pipe.engine.llm import prompt_token_budget
from r1pipe.errors import ConfigError, DataError
from r1pipe.model import Precision, parse_dtype
from r1pipe.rewards import build_reward_fn, domain_of, missing_reference, solved
from r1pipe.rewards.worker import RewardPool
from r1pipe.stages.base import StageContext, load_object
from r1pipe.stages.base_eval import share_solved
from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.sections import Workers
from r1pipe.tracking import MetricsLogger, StepProgress, plot_metrics
from r1pipe.tracking.checkpoints import check_room_for_checkpoints, latest_checkpoint, write_checkpoint
from r1pipe.tracking.plots import DEFAULT_PLOTS
from r1pipe.workers import DraftStats, PolicyConfig, RolloutBatch
from r1pipe.workers.batch import Completion
from r1pipe.workers.cluster import ray_init
from r1pipe.workers.generation import GenerationGroup, Pending, Sampling
from r1pipe.workers.group import PolicyGroup
from r1pipe.workers.placement import ResourcePlan, reserve, role_resources
from r1pipe.workers.weight_sync import check_probe

PREFETCH_FILE = "prefetched_rollouts.pt"  # in a checkpoint of an asynchronous run
# the training budget, counted over the run and kept in the checkpoints' trainer state (so a resumed run
# reports the uninterrupted one's totals): optimizer steps taken (steps x algorithm.updates_per_step, less any
# update left without rows: a step whose groups were all dropped), and every training completion the engines
# sampled (groups dynamic sampling dropped included; held-out checks and sync probes not), with its tokens
BUDGET_KEYS = ("optimizer_steps", "sampled_tokens", "sampled_sequences")


def resource_plan(cfg: GRPOConfig) -> ResourcePlan:
    """Per-role Ray resources from rl.resources (trainer, rollout, reward); reward workers only when a
    reward pool runs."""
    r = cfg.resources
    roles = [role_resources("policy", r.trainer, "rl.resources.trainer"),
             role_resources("rollout", r.rollout, "rl.resources.rollout")]
    if cfg.rewards.weights:
        roles.append(role_resources("reward", r.reward, "rl.resources.reward", in_group=False))
    return ResourcePlan(roles)


# ---------------------------------------------------------------- data


class PromptStream:
    """Problems in a fresh seeded order every epoch; the position (prompts consumed) is all the
    state a checkpoint needs to continue the same sequence."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        if not rows:
            raise ValueError("no training problems")
        self.rows, self.seed, self.position = rows, seed, position
        self._epoch, self._order = -1, []

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.position, len(self.rows))
            if epoch != self._epoch:
                self._order = epoch_order(len(self.rows), self.seed, epoch)
                self._epoch = epoch
            out.append(self.rows[self._order[index]])
            self.position += 1
        return out


# ---------------------------------------------------------------- rollouts sampled ahead


@dataclass
class Prefetch:
    """The first round of a step's rollouts, started before the previous step trains (max_staleness 1):
    its prompts, the policy version the engines had when it started (with partial rollouts the tokens after
    the sync carry the next one: Completion.token_versions), and the engines' pending results."""

    problems: list[dict]
    version: int
    pending: Pending | None = None  # the engines' work while it runs
    done: list[list[Completion]] | None = None

    def groups(self) -> list[list[Completion]]:
        """The completions of each prompt (waiting for the engines if they are still at it)."""
        if self.done is None:
            self.done = self.pending.result()
            for c in (c for g in self.done for c in g):
                c.version = self.version
            self.pending = None
        return self.done

    def save(self, path: Path) -> None:
        """Into a checkpoint, so a resumed run trains on exactly these rollouts (they are not regenerated)."""
        torch.save({"problems": self.problems, "version": self.version, "groups": self.groups()}, path)

    @classmethod
    def load(cls, path: Path) -> "Prefetch":
        saved = torch.load(path, weights_only=False)  # r1pipe's own file: dataclasses of lists and ints
        return cls(saved["problems"], saved["version"], done=saved["groups"])


# ---------------------------------------------------------------- rewards


class Scorer:
    """The RewardPool plus any extra reward functions. Nothing it scores can stop the run: a reward
    that raises scores 0 and is counted (the pool does this per reward; here too for extra rewards
    and for a pool whose worker died, which is then rebuilt)."""

    def __init__(self, weights: dict[str, float], extra: dict[str, float], workers: Workers,
                 options: dict[str, Any] | None = None):
        self.weights, self.workers, self.options = dict(weights), workers, dict(options or {})
        self.extra = {spec: (w, load_object(spec, "extra reward")) for spec, w in extra.items()}
        self.pool = self._new_pool() if self.weights else None
        self.errors: list[str] = []

    def _new_pool(self) -> Any:
        return RewardPool(self.weights, num_workers=self.workers.workers, num_cpus_per_worker=self.workers.cpus,
                          threads_per_worker=self.workers.threads or None, resources=dict(self.workers.custom), **self.options)

    def score(self, texts: list[str], references: list[dict]) -> tuple[list[float], dict[str, list[float]], int]:
        """(total reward per text, component -> values, number of reward errors)."""
        n = len(texts)
        totals = [0.0] * n
        components: dict[str, list[float]] = {}
        errors = 0
        if self.pool is not None:
            try:
                results = self.pool.score(texts, references)
            except Exception as e:  # a reward worker died: score this batch 0 and start a new pool
                self.errors.append(f"reward pool failed: {type(e).__name__}: {e}")
                errors += n
                results = None
                self.pool = self._new_pool()
            if results is not None:
                for i, r in enumerate(results):
                    totals[i] += float(r.total)
                    for name, value in r.components.items():
                        components.setdefault(name, [0.0] * n)[i] = float(value)
                    errors += len(r.info.get("errors", []) or []) if isinstance(r.info, dict) else 0
        for spec, (weight, fn) in self.extra.items():
            values = components.setdefault(spec.rpartition(":")[2], [0.0] * n)
            for i, (text, ref) in enumerate(zip(texts, references)):
                try:
                    value = float(fn(text, ref))
                    if not math.isfinite(value):
                        raise ValueError(f"non-finite reward {value}")
                except Exception as e:
                    errors += 1
                    if len(self.errors) < 100:
                        self.errors.append(f"{spec}: {type(e).__name__}: {e}")
                    value = 0.0
                values[i] = value
                totals[i] += weight * value
        return totals, components, errors


# ---------------------------------------------------------------- the stage


def run_grpo(cfg: GRPOConfig, ctx: StageContext) -> dict:
    return GRPOTrainer(cfg, ctx).run()


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.stage_dir = Path(ctx.stage_dir)
        self.ckpt_root = self.stage_dir / "checkpoints"
        self.data_reports: dict[str, dict] = {}
        self.prompt_ids: dict[str, list[int]] = {}  # rendered prompt -> its token ids (tokenized once, here)
        self.timings: dict[str, float] = {}
        self.base_model = ""
        self.checkpoint_bytes = 0  # a checkpoint's size, from the policy workers once they start
        self.heldout_by_domain: dict[str, float] = {}  # the latest held-out accuracy per domain (mixed held-out sets)
        self.version = 0  # weight syncs so far: the engines' policy version
        self.step_number = 0  # the step running (1-based)
        self.pending: Prefetch | None = None  # the next step's rollouts, running while this step trains
        self.probe_due = False  # a sync's probe check waits for the engines to be idle (partial rollouts)
        self.budget: dict[str, int | None] = dict.fromkeys(BUDGET_KEYS, 0)  # BUDGET_KEYS; None: not known

    def count(self, key: str, n: int) -> None:
        """Add n to the budget's `key` (one that is not known stays so)."""
        if self.budget[key] is not None:
            self.budget[key] += int(n)

    # ---- setup

    def _ray_init(self) -> None:
        ray_init(self.ctx.recipe)

    def _problems(self, key: str, explicit: Optional[str], model_path: str) -> list[dict]:
        """Problems through the data layer, tokenized once here on the driver: rows without what the
        rewards need, or too long for the engine's context, are skipped and counted before any actor
        starts. A row is the source row (the reference the rewards read) plus `prompt` (templated)."""
        cfg = self.cfg
        source = explicit or self.ctx.output(key)
        if not source:
            raise ConfigError(f"grpo: no {key} (set it in the recipe or run a stage that outputs it)")
        fields = {"prompt": cfg.data.prompt_field, "answer": cfg.data.answer_field, "id": cfg.data.id_field}
        rows, report = load_prompt_rows(
            str(source), load_tokenizer(model_path), split=cfg.data.split, fields=fields, template=cfg.data.template,
            max_prompt_tokens=prompt_token_budget(model_path, dict(cfg.rollout.engine), cfg.rollout.max_tokens),
            check_reference=lambda ref: missing_reference(cfg.rewards.weights, ref), option_prefix="rl.data.",
            log=lambda line: print(f"grpo: {line}"),
        )
        self.data_reports[key] = report.to_dict()
        self.prompt_ids.update((r.prompt, r.prompt_ids) for r in rows)
        if not rows:
            raise DataError(f"grpo: {source}: no usable problems ({report.summary()})")
        return [{**r.reference, "id": r.id, "prompt": r.prompt} for r in rows]

    def _check_reward_options(self) -> None:
        try:
            build_reward_fn(dict(self.cfg.rewards.weights), **dict(self.cfg.rewards.options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"rl.rewards.options / rl.rewards.weights: {e}") from None

    def _check_model(self) -> None:
        """What the workers would find out only when they start, checked on the driver: the engine runs the
        model's family; the drafter (MTP speculation, the draft loss) needs a model with an MTP module; routing
        replay, FP8 and an expert-parallel engine (rl.rollout.engine.ep_size) need r1pipe's DeepSeek-V3 (a dense
        model has no experts and no FP8 path)."""
        model_type = check_supported(self.base_model)
        check_expert_parallel(self.base_model, self.cfg.parallelism.ep_size, self.cfg.resources.trainer.workers,
                              f"{self.stage_dir.name}.parallelism.ep_size")
        GenerationGroup.check_engines(self.base_model, self.cfg.resources.rollout.workers, dict(self.cfg.rollout.engine),
                                      self.cfg.rollout.backend, f"{self.stage_dir.name}.rollout.engine")
        if model_type != V3:
            engine = dict(self.cfg.rollout.engine)
            refused = [("rl.rollout.routing_replay", self.cfg.rollout.routing_replay),
                       ("rl.rollout.engine.fp8", engine.get("fp8")),
                       ("model.fp8", (self.ctx.recipe.get("model") or {}).get("fp8"))]
            for key, value in refused:
                if value:
                    raise ConfigError(f"{key}: needs r1pipe's DeepSeek-V3; {self.base_model} is a {model_type} model")
        if not (self.speculative_k or self.draft_loss):
            return
        if int(model_config(self.base_model).get("num_nextn_predict_layers") or 0) < 1:
            what = "rl.rollout.engine.speculative_k > 0" if self.speculative_k else "rl.algorithm.draft_loss"
            raise ConfigError(f"{what} needs a model with an MTP module; {self.base_model} has none "
                              "(num_nextn_predict_layers = 0)")

    def _start_workers(self, policy_path: str, rollout_path: str) -> None:
        """Policy workers (and the KL reference) from the stage's initial policy `policy_path`;
        rollout engines from `rollout_path` (the checkpoint being resumed, or the same)."""
        cfg = self.cfg
        precision = Precision.from_section(self.ctx.recipe.get("model") or {})  # model.dtype / fp8 / fp8_exclude
        algo, optim, par = cfg.algorithm, cfg.optim, cfg.parallelism
        policy_cfg = PolicyConfig(
            lr=optim.lr, weight_decay=optim.weight_decay, adam_betas=(optim.betas[0], optim.betas[1]), grad_clip=optim.grad_clip,
            clip_low=algo.clip_low, clip_high=algo.clip_high, loss=algo.loss, loss_agg=algo.loss_agg, kl_coef=algo.kl_coef,
            norm_constant=float(cfg.rollout.max_tokens), temperature=cfg.rollout.temperature,
            micro_batch_size=algo.micro_batch_size, bias_update_gamma=algo.bias_update_gamma,
            freeze_router_bias=algo.freeze_router_bias, draft_loss=self.draft_loss, draft_lr_scale=algo.draft_lr_scale,
            draft_depth=max(self.speculative_k, 1),
            device=cfg.resources.device, num_threads=cfg.resources.trainer.threads, seed=self.ctx.seed,
            precision=precision, fsdp=par.fsdp, fsdp_keep_gathered=par.fsdp_keep_gathered, ep_size=par.ep_size,
            activation_checkpointing=par.activation_checkpointing, share_prompts=algo.share_prompts,
            shared_memory=cfg.sync.shared_memory,
        )
        self.placement = reserve(resource_plan(cfg), cfg.resources.placement_timeout_s, cfg.resources.placement_strategy)
        self.policy = PolicyGroup(cfg.resources.trainer.workers, policy_path, policy_cfg,
                                  policy_path if cfg.algorithm.kl_coef > 0 else None,
                                  placement=self.placement)
        engine_kwargs = {"device": cfg.resources.device, "dtype": precision.dtype, **dict(cfg.rollout.engine)}
        self.rollout = GenerationGroup(rollout_path, self.placement, workers=cfg.resources.rollout.workers,
                                       engine=engine_kwargs, seed=self.ctx.seed, threads=cfg.resources.rollout.threads or None,
                                       backend=cfg.rollout.backend, key=f"{self.stage_dir.name}.rollout.engine",
                                       concurrency=2 if cfg.rollout.partial_rollouts else 1)
        self.rollout.on_each("set_policy_version", self.version)  # a resumed run's engines hold the checkpoint's
        self.pad_id = ray.get(self.rollout.workers[0].pad_token_id.remote())
        self.policy.connect_engines(self.rollout.workers, cfg.sync.bucket_mb, cfg.sync.shared_memory,
                                    engines_read_in_place=cfg.rollout.max_staleness == 0)
        self.scorer = Scorer(dict(cfg.rewards.weights), dict(cfg.rewards.extra), cfg.resources.reward, dict(cfg.rewards.options))

    # ---- the settings that follow from the engine

    @property
    def speculative_k(self) -> int:
        return int(dict(self.cfg.rollout.engine).get("speculative_k", 0) or 0)

    @property
    def draft_loss(self) -> bool:
        """Keep the MTP drafter fresh: on by default when the engine speculates with it."""
        return self.speculative_k > 0 if self.cfg.algorithm.draft_loss is None else bool(self.cfg.algorithm.draft_loss)

    @property
    def skip_zero_advantage(self) -> bool:
        """Leave rows with zero advantage (every reward of their group equal) out of the forward and
        backward: their policy-gradient term is exactly 0, and with no KL term and no draft loss nothing
        else trains on them. Their tokens still count in the loss's denominators, so the gradient is the
        one of the whole batch; the MoE expert loads that steer the balancing bias, and the entropy and
        clip metrics, then cover the trained rows only."""
        return self.cfg.algorithm.skip_zero_advantage and self.cfg.algorithm.kl_coef == 0 and not self.draft_loss

    @property
    def tis(self) -> bool:
        """Truncated importance sampling: on by default when the engine runs in another precision
        than float32 (rl.rollout.engine.dtype, else model.dtype: bf16 weights in the engine never match the
        trainer's autocast over fp32 masters exactly) or holds FP8 projections (rl.rollout.engine.fp8), when
        rollouts are one version old (max_staleness 1) and when vLLM generates (rl.rollout.backend: vllm: its
        kernels are not the trainer's); off on r1pipe's exact synchronous float32 path (the config refuses
        tis: false with fp8 or max_staleness 1)."""
        if self.cfg.algorithm.tis is not None:
            return bool(self.cfg.algorithm.tis)
        if dict(self.cfg.rollout.engine).get("fp8") or self.cfg.rollout.max_staleness > 0 or self.cfg.rollout.backend == "vllm":
            return True
        model_dtype = (self.ctx.recipe.get("model") or {}).get("dtype") or "float32"
        return parse_dtype(dict(self.cfg.rollout.engine).get("dtype") or model_dtype, key="rl.rollout.engine.dtype") != torch.float32

    # ---- rollout

    def _launch(self, prompts: list[str], n: int, temperature: float, seeds: list[int]) -> Pending:
        """Start sampling n completions of each prompt (prompt i with seeds[i]) on the rollout group. The
        engines get the token ids made once on the driver when loading the problems."""
        cfg = self.cfg.rollout
        sampling = Sampling(k=n, temperature=temperature, max_tokens=cfg.max_tokens, stop=tuple(cfg.stop), seed=self.ctx.seed)
        return self.rollout.submit([self.prompt_ids.get(p, p) for p in prompts], sampling, seeds,
                                   return_routing=cfg.routing_replay and temperature > 0)

    def _generate(self, prompts: list[str], n: int, temperature: float, seeds: list[int]) -> list[list[Completion]]:
        """The n completions of each prompt, sampled by the engines' current weights (`self.version`)."""
        groups = self._launch(prompts, n, temperature, seeds).result()
        for c in (c for g in groups for c in g):
            c.version = self.version
        return groups

    def prefetch(self, stream: PromptStream) -> Prefetch:
        """Start the next step's first round of rollouts on the engines' current weights, to run while the
        trainer trains (max_staleness 1)."""
        first = stream.position
        problems = stream.take(self.cfg.rollout.prompts_per_step)
        pending = self._launch([p["prompt"] for p in problems], self.cfg.rollout.group_size, self.cfg.rollout.temperature,
                               self._seeds(first, len(problems)))
        return Prefetch(problems, self.version, pending=pending)

    def _seeds(self, first: int, n: int) -> list[int]:
        """The sampling seed of each prompt, from its position in the prompt stream."""
        return [hash((self.ctx.seed, first + i)) % (2**31) for i in range(n)]

    def heldout_accuracy(self, rows: list[dict]) -> float:
        """Greedy pass@1 on the held-out problems, by the accuracy reward (as r1pipe.stages.base_eval);
        rows of several domains are each graded by their own domain's reward, and the share per
        domain is kept in self.heldout_by_domain."""
        groups = self._generate([r["prompt"] for r in rows], 1, 0.0, [0] * len(rows))
        _, components, _ = self.scorer.score([g[0].text for g in groups], [dict(r) for r in rows])
        domains = [domain_of(r) for r in rows]
        if len(set(domains)) > 1:
            names = list(self.cfg.rewards.weights)
            ok = [float(solved({k: v[i] for k, v in components.items()}, r, names)) for i, r in enumerate(rows)]
            self.heldout_by_domain = {d: share_solved([o for o, dd in zip(ok, domains) if dd == d]) for d in sorted(set(domains))}
            return share_solved(ok)
        acc = components.get(self.cfg.rewards.accuracy_reward)
        if acc is None:
            raise ConfigError(f"held-out accuracy needs the {self.cfg.rewards.accuracy_reward!r} reward in rl.rewards.weights")
        return share_solved(acc)

    def collect(self, stream: PromptStream, prefetched: Prefetch | None = None) -> RolloutBatch:
        """Sample and score groups until prompts_per_step groups are kept (dynamic sampling drops
        groups whose rewards are all equal and refills up to max_refill_rounds times), counting every
        completion scored, dropped ones too, in the budget. `prefetched`: the first round, sampled while the
        previous step trained (its wait counts as rollout time)."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        batch = RolloutBatch(problems=[], completions=[])
        for round_ in range(1 + (cfg.rollout.max_refill_rounds if cfg.rollout.dynamic_sampling else 0)):
            need = cfg.rollout.prompts_per_step - len(batch.problems)
            if need <= 0:
                break
            ta = time.perf_counter()
            if round_ == 0 and prefetched is not None:
                problems, groups = prefetched.problems, prefetched.groups()
            else:
                first = stream.position
                problems = stream.take(need if round_ else cfg.rollout.prompts_per_step)
                groups = self._generate([p["prompt"] for p in problems], G, cfg.rollout.temperature, self._seeds(first, len(problems)))
            self.timings["rollout"] += time.perf_counter() - ta
            rewards = self.score(problems, groups, batch)
            keep = dynamic_sampling_keep(torch.tensor(rewards), G) if cfg.rollout.dynamic_sampling else torch.ones(len(problems), dtype=torch.bool)
            batch.groups_seen += len(problems)
            for problem, group, kept in zip(problems, groups, keep.tolist()):
                if kept and len(batch.problems) < cfg.rollout.prompts_per_step:
                    batch.problems.append(problem)
                    batch.completions.extend(group)
        self.count("sampled_tokens", batch.generated_tokens)
        self.count("sampled_sequences", len(batch.all_rewards))
        return batch

    def score(self, problems: list[dict], groups: list[list[Completion]], batch: RolloutBatch) -> list[float]:
        """Rewards (plus the soft overlong penalty) of every completion, written into the completions;
        the totals, components and error count are added to `batch`'s record of what was seen."""
        cfg = self.cfg
        flat = [(p, c) for p, group in zip(problems, groups) for c in group]
        ta = time.perf_counter()
        rewards, components, errors = self.scorer.score([c.text for _, c in flat], [dict(p) for p, _ in flat])
        self.timings["reward"] += time.perf_counter() - ta
        if cfg.rollout.overlong == "soft":
            lengths = torch.tensor([len(c.token_ids) for _, c in flat])
            penalty = overlong_soft_penalty(lengths, cfg.rollout.max_tokens, cfg.rollout.overlong_cache, cfg.rollout.overlong_penalty)
            rewards = [r + float(q) for r, q in zip(rewards, penalty)]
        for (_, c), r in zip(flat, rewards):
            c.reward = r
        batch.all_rewards += rewards
        for name, values in components.items():
            batch.components.setdefault(name, []).extend(values)
        names = list(cfg.rewards.weights)
        for i, (p, _) in enumerate(flat):  # per-row routing: each row graded by its domain's reward
            batch.domains.append(domain_of(p))
            batch.solved.append(solved({k: v[i] for k, v in components.items()}, p, names))
        batch.reward_errors += errors
        batch.generated_tokens += sum(len(c.token_ids) for _, c in flat)
        return rewards

    # ---- training

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """Advantages, old/ref log-probs, the update(s) (with TIS weights and the trainer/engine log-prob
        mismatch measured on the old log-probs); returns the step's training metrics. With one update per
        batch the old log-probs are the update's own forward, detached: no separate forward."""
        cfg = self.cfg
        rewards = torch.tensor([c.reward for c in batch.completions])
        advantages = compute_advantages(cfg.algorithm.advantage, rewards, cfg.rollout.group_size)
        train_batch = batch.train_batch(self.pad_id, with_routing=cfg.rollout.routing_replay)
        truncated = torch.tensor([c.truncated for c in batch.completions])
        if cfg.rollout.overlong == "filter":
            train_batch.response_mask *= overlong_filter_mask(truncated).unsqueeze(-1)

        ta = time.perf_counter()
        old_logp = self.policy.logprobs(train_batch) if cfg.algorithm.updates_per_step > 1 else None
        ref_logp = self.policy.logprobs(train_batch, reference=True) if cfg.algorithm.kl_coef > 0 else None
        # the engine's log-probs of the rollout tokens: the trainer's old ones are compared with them
        engine_logp = batch.engine_logprobs((len(train_batch), train_batch.input_ids.shape[1] - 1))
        out: dict[str, float] = {"response_length/truncated": float(truncated.float().mean())}

        o = cfg.optim  # the step's lr: optim.schedule over the stage's steps (self.step_number is 1-based)
        scheduled = o.schedule != "constant" or o.warmup_steps > 0
        lr = scheduled_lr(o.schedule, max(self.step_number - 1, 0), cfg.steps, o.warmup_steps, o.lr, o.min_lr_ratio)
        out["lr"] = lr
        sums: dict[str, float] = {}
        bounds = [round(i * len(batch) / cfg.algorithm.updates_per_step) for i in range(cfg.algorithm.updates_per_step + 1)]
        grad_norms, maxvios = [], []
        for u in range(cfg.algorithm.updates_per_step):
            rows = torch.arange(bounds[u], bounds[u + 1])
            if len(rows) == 0:
                continue
            mini = train_batch.rows(rows)
            trained = rows[advantages[rows] != 0] if self.skip_zero_advantage else rows
            stats = self.policy.train_step(
                train_batch.rows(trained), None if old_logp is None else old_logp[trained], advantages[trained],
                None if ref_logp is None else ref_logp[trained],
                num_tokens=float(mini.response_mask.sum()), num_seqs=float(len(rows)),  # skipped rows count here
                num_draft_positions=float(mini.response_mask[:, 1:].sum()),
                engine_logp=engine_logp[trained], tis_cap=cfg.algorithm.tis_cap if self.tis else None,
                lr=lr if scheduled else None,  # None: the workers' own optim.lr
            )
            grad_norms.append(stats.pop("grad_norm"))
            maxvios.append(stats.pop("maxvio"))
            for k, v in stats.items():
                sums[k] = max(sums.get(k, 0.0), v) if k.endswith("_max") else sums.get(k, 0.0) + v
        self.timings["train"] = time.perf_counter() - ta
        self.count("optimizer_steps", len(grad_norms))
        tokens = max(sums.get("tokens", 0.0), 1.0)
        out["logprob_mismatch/mean_abs"] = sums.get("mismatch_abs", 0.0) / tokens
        out["logprob_mismatch/max_abs"] = sums.get("mismatch_max", 0.0)
        if self.tis:
            out["tis/clipped_share"] = sums.get("tis_clipped", 0.0) / tokens
            out["tis/weight_mean"] = sums.get("tis_weight", 0.0) / tokens
        out.update({
            "loss": sums.get("loss", 0.0) / max(len(grad_norms), 1),
            "kl": sums.get("kl", 0.0) / tokens,
            "entropy": sums.get("entropy", 0.0) / tokens,
            "clip_fraction": sums.get("clipped", 0.0) / tokens,
            "clip_fraction/high": sums.get("clipped_high", 0.0) / tokens,
            "clip_fraction/low": sums.get("clipped_low", 0.0) / tokens,
            "ratio/mean": sums.get("ratio", 0.0) / tokens,
            "grad_norm": _mean(grad_norms),
            "moe/maxvio": max(maxvios) if maxvios else 0.0,
            "advantage/abs_mean": float(advantages.abs().mean()),
            "advantage/zero_share": float((advantages == 0).float().mean()),
            "tokens_per_second/train": sums.get("tokens", 0.0) / max(self.timings["train"], 1e-9),
        })
        if self.draft_loss:
            out["mtp/draft_loss"] = sums.get("draft_loss", 0.0) / max(len(grad_norms), 1)
        return out

    def sync(self, step: int) -> float | None:
        """The policy's new weights to every rollout engine over torch.distributed, then (at the first
        sync of the stage and every sync.check_every steps) the probe check: a fixed prompt's sampled
        tokens scored by engine and trainer must agree (else SyncMismatch). Returns the probe's mean
        |trainer - engine| log-prob, or None when not checked. With partial rollouts the engines take the
        weights in the middle of the next step's generation; the probe then waits for them to be idle
        (`probe_due`: run by `step` once the next step's rollouts are collected, before it trains)."""
        ta = time.perf_counter()
        self.policy.sync_weights()
        self.version += 1
        every = self.cfg.sync.check_every
        first = not getattr(self, "_synced", False)
        self._synced = True
        diff = None
        if every and (first or step % every == 0):
            if self.cfg.rollout.partial_rollouts and self.pending is not None:
                self.probe_due = True
            else:
                diff = self.check_sync()
        self.timings["sync"] = time.perf_counter() - ta
        return diff

    @property
    def sync_check_tol(self) -> float:
        if self.cfg.sync.check_tol is not None:
            return float(self.cfg.sync.check_tol)
        return 0.1 if self.tis else 1e-3  # tis is on by default exactly when the engine is not r1pipe's float32 one

    def check_sync(self) -> float:
        """Every engine samples the probe (the first training prompt, fixed seed); the trainer scores
        the same tokens; check_probe raises on disagreement."""
        prompt = [self.probe_prompt]
        groups = self.rollout.on_each("generate", prompt, 2, self.cfg.rollout.temperature, self.cfg.rollout.max_tokens, [0])
        batch = RolloutBatch(problems=[], completions=[c for g in groups for c in g[0]])
        train_batch = batch.train_batch(self.pad_id)
        trainer = self.policy.logprobs(train_batch)
        return check_probe(trainer, batch.engine_logprobs(tuple(trainer.shape)), train_batch.response_mask, self.sync_check_tol)

    def draft_stats(self) -> DraftStats:
        """MTP drafts the engines proposed and accepted since the last call."""
        return sum(self.rollout.on_each("take_draft_stats"), DraftStats())

    def checkpoint(self, step: int, state: dict, stream: PromptStream, t_start: float) -> None:
        """Model, optimizer, RNG, data position and policy version (and the next step's prefetched rollouts),
        written atomically after a free-space check (DiskFullError); older ones pruned."""
        state.update(step=step, data_position=stream.position, version=self.version,
                     wall_seconds=time.perf_counter() - t_start, budget=dict(self.budget))

        def write(staging: Path) -> None:
            self.policy.save_checkpoint(str(staging), self.base_model)
            if self.pending is not None:
                self.pending.save(staging / PREFETCH_FILE)

        write_checkpoint(self.ckpt_root, step, write, state, keep=self.cfg.checkpoint.keep,
                         need_bytes=self.checkpoint_bytes)

    # ---- one step, top to bottom

    def step(self, step: int, stream: PromptStream, heldout_rows: list[dict]) -> dict[str, Any]:
        cfg = self.cfg
        self.step_number = step
        t0 = time.perf_counter()
        self.timings = {"rollout": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0, "heldout": 0.0}
        if self.speculative_k:
            self.draft_stats()  # drop what held-out evaluation proposed
        batch = self.collect(stream, self.pending)
        self.pending = None
        metrics = rollout_metrics(batch, cfg.rewards.accuracy_reward)
        metrics.update(staleness_metrics(batch, self.version))
        metrics["data_position"] = stream.position
        metrics["tokens_per_second/rollout"] = batch.generated_tokens / max(self.timings["rollout"], 1e-9)
        if self.speculative_k:
            drafts = self.draft_stats()
            metrics["mtp/acceptance"] = drafts.acceptance
            metrics["mtp/acceptance_first"] = drafts.first_acceptance
            if self.speculative_k > 1:
                metrics["mtp/acceptance_chained"] = drafts.chained_acceptance
        if self.probe_due:  # the last sync's probe: the engines are idle now and the trainer has not trained since
            ta = time.perf_counter()
            metrics["sync/probe_logprob_diff"] = self.check_sync()
            self.probe_due = False
            self.timings["sync"] += time.perf_counter() - ta
        if len(batch):
            if cfg.rollout.max_staleness and step < cfg.steps:
                self.pending = self.prefetch(stream)  # the engines sample the next step while the trainer trains
            metrics.update(self.train(batch))
            if self.pending is not None and not cfg.rollout.partial_rollouts:
                # a sync waits for the engines to finish: wait here, as rollout time (partial rollouts: it does not)
                ta = time.perf_counter()
                self.pending.groups()
                self.timings["rollout"] += time.perf_counter() - ta
            probe = self.sync(step)
            if probe is not None:
                metrics["sync/probe_logprob_diff"] = probe
        if cfg.data.eval_every and step % cfg.data.eval_every == 0 and step < cfg.steps:
            t_eval = time.perf_counter()
            metrics["heldout_accuracy"] = self.heldout_accuracy(heldout_rows)
            metrics.update({f"heldout_accuracy/{d}": v for d, v in self.heldout_by_domain.items()})
            self.timings["heldout"] = time.perf_counter() - t_eval
        step_time = time.perf_counter() - t0
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        metrics["time/step"] = step_time
        # what each side waited for: the trainer for rollouts (and scoring), the engines for weights
        metrics["time/trainer_idle"] = step_time - self.timings["train"]
        metrics["time/engine_idle"] = step_time - _mean(self.rollout.on_each("take_busy_seconds"))
        metrics["tokens_per_second"] = batch.generated_tokens / max(step_time, 1e-9)
        return metrics

    # ---- the stage

    def run(self) -> dict:
        cfg = self.cfg
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = str(Path(cfg.model_path).expanduser() if cfg.model_path else self.ctx.model_path())
        self._check_reward_options()
        self._check_model()
        train_rows = self._problems("train_path", cfg.data.train_path, self.base_model)
        if len(train_rows) < cfg.rollout.prompts_per_step:
            print(f"grpo: warning: {len(train_rows)} usable training problem{'s' if len(train_rows) != 1 else ''} for "
                  f"rl.rollout.prompts_per_step={cfg.rollout.prompts_per_step}: every step repeats each problem about "
                  f"{cfg.rollout.prompts_per_step / len(train_rows):.1f}x", file=sys.stderr)
        all_heldout = self._problems("heldout_path", cfg.data.heldout_path, self.base_model)
        heldout_rows = all_heldout[: cfg.data.heldout_size]
        # the held-out problems for a later eval stage (`suites: [heldout]` reads the bare question
        # from "problem"; an R1-Zero prompt there is used as is)
        heldout_out = self.stage_dir / "heldout.jsonl"
        write_jsonl(heldout_out, ({**r, "problem": r.get("problem", r["prompt"])} for r in all_heldout))
        self._ray_init()

        resume = latest_checkpoint(self.ckpt_root)
        state: dict[str, Any] = {"step": 0, "data_position": 0, "wall_seconds": 0.0, "base_accuracy": None}
        rollout_model = self.base_model
        if resume is not None:
            rollout_model, state = str(resume[0]), resume[1]
            self.version = state.get("version", state["step"])
            # a checkpoint that did not count the budget leaves it unknown, not counted from the resume on
            self.budget = dict(state.get("budget") or dict.fromkeys(BUDGET_KEYS))
            if (resume[0] / PREFETCH_FILE).exists():  # the next step's rollouts, as the interrupted run had them
                self.pending = Prefetch.load(resume[0] / PREFETCH_FILE)
            print(f"grpo: resuming after step {state['step']} from {resume[0]}")
        # the policy and its KL reference start from the base; a resumed policy then loads its checkpoint
        self._start_workers(self.base_model, rollout_model)
        if resume is not None:
            self.policy.load_checkpoint(rollout_model)
        # a run that cannot write its checkpoints stops before it trains, not at a later save
        self.checkpoint_bytes = self.policy.checkpoint_bytes()
        saves = [s for s in range(state["step"] + 1, cfg.steps + 1) if s % cfg.checkpoint.every == 0 or s == cfg.steps]
        check_room_for_checkpoints(self.ckpt_root, self.checkpoint_bytes, len(saves), cfg.checkpoint.keep)

        t_start = time.perf_counter() - state["wall_seconds"]
        if state["base_accuracy"] is None:
            state["base_accuracy"] = self.heldout_accuracy(heldout_rows)
            print(f"grpo: held-out accuracy of the base model: {state['base_accuracy']:.3f} on {len(heldout_rows)} problems")
        stream = PromptStream(train_rows, self.ctx.seed, state["data_position"])
        self.probe_prompt = self.prompt_ids.get(train_rows[0]["prompt"], train_rows[0]["prompt"])
        step = state["step"]
        logger = MetricsLogger(self.stage_dir, resume_step=step)
        if step == 0:
            logger.log(0, {"heldout_accuracy": state["base_accuracy"],
                           **{f"heldout_accuracy/{d}": v for d, v in self.heldout_by_domain.items()}})

        self.rollout.on_each("take_busy_seconds")  # the base check is not a step's work
        with StepProgress(cfg.steps, step, "grpo", show=("reward/mean", "accuracy", "response_length/mean")) as progress:
            while step < cfg.steps:
                step += 1
                metrics = self.step(step, stream, heldout_rows)
                if step == cfg.steps:
                    metrics["heldout_accuracy"] = state["final_accuracy"] = self.heldout_accuracy(heldout_rows)
                    metrics.update({f"heldout_accuracy/{d}": v for d, v in self.heldout_by_domain.items()})
                logger.log(step, metrics)
                progress.advance(metrics)
                if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                    self.checkpoint(step, state, stream, t_start)

        logger.close()
        if "final_accuracy" not in state:  # resumed after the last step's checkpoint
            state["final_accuracy"] = self.heldout_accuracy(heldout_rows)
        final = latest_checkpoint(self.ckpt_root)
        assert final is not None
        by_domain = ["accuracy/math", "accuracy/code", "heldout_accuracy/math", "heldout_accuracy/code"]
        plots = plot_metrics(self.stage_dir / "metrics.jsonl", self.stage_dir / "plots", {
            **DEFAULT_PLOTS, "accuracy_by_domain": ("accuracy by domain", by_domain),
            "staleness": ("policy versions behind the trainer", ["staleness/mean", "staleness/max"]),
            "idle": ("seconds of a step spent waiting", ["time/trainer_idle", "time/engine_idle"]),
            "importance": ("share of tokens clipped", ["clip_fraction", "tis/clipped_share"]),
        })
        summary = {
            "base_model": self.base_model,
            "base_accuracy": state["base_accuracy"],
            "final_accuracy": state["final_accuracy"],
            "final_accuracy_by_domain": self.heldout_by_domain,
            "heldout_size": len(heldout_rows),
            "steps": cfg.steps,
            **self.budget,
            "wall_seconds": time.perf_counter() - t_start,
            "reward_errors_sample": self.scorer.errors[:5],
            "data": self.data_reports,
        }
        (self.stage_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.policy.shutdown()
        self.rollout.shutdown()
        self.placement.remove()
        print(f"grpo: held-out accuracy {summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
              f"in {cfg.steps} steps, {summary['wall_seconds']:.0f}s")
        return {
            "model_path": str(final[0]),
            "heldout_path": str(heldout_out),
            "summary_path": str(self.stage_dir / "summary.json"),
            "metrics_path": str(self.stage_dir / "metrics.jsonl"),
            "plots": [str(p) for p in plots],
            "base_accuracy": summary["base_accuracy"],
            "final_accuracy": summary["final_accuracy"],
            "steps": summary["steps"],
            **self.budget,
            "wall_seconds": round(summary["wall_seconds"], 1),
        }


def staleness_metrics(batch: RolloutBatch, version: int) -> dict[str, float]:
    """How many policy versions behind the trainer's weights (`version`) the batch's tokens were sampled
    (min, token mean, max of version - Completion.versions()), and the share of completions whose tokens
    span more than one version (partial rollouts: a sync landed while they were generated)."""
    per_completion = [c.versions() for c in batch.completions]
    lags = [version - v for versions in per_completion for v in versions] or [0]
    return {"staleness/min": float(min(lags)), "staleness/mean": _mean([float(x) for x in lags]),
            "staleness/max": float(max(lags)),
            "staleness/spanning_share": _mean([float(len(set(v)) > 1) for v in per_completion])}


def rollout_metrics(batch: RolloutBatch, accuracy_reward: str) -> dict[str, Any]:
    """Reward, accuracy, group and length figures of everything a step sampled (dropped groups too)."""
    n = max(len(batch.all_rewards), 1)
    metrics: dict[str, Any] = {
        "reward/mean": _mean(batch.all_rewards),
        **{f"reward/{k}": _mean(v) for k, v in batch.components.items()},
        "reward/errors": batch.reward_errors,
        "groups_kept": len(batch.problems) / max(batch.groups_seen, 1),
        "response_length/mean": batch.generated_tokens / n,
        "response_length/truncated": 0.0,
    }
    if accuracy_reward in batch.components:
        metrics["accuracy"] = _mean([float(a > 0.5) for a in batch.components[accuracy_reward]])
    if len(set(batch.domains)) > 1:  # mixed-domain batches: each row graded by its own domain's reward
        metrics["accuracy"] = _mean([float(x) for x in batch.solved])
        for d in sorted(set(batch.domains)):
            metrics[f"accuracy/{d}"] = _mean([float(x) for x, dd in zip(batch.solved, batch.domains) if dd == d])
            metrics[f"domain_share/{d}"] = batch.domains.count(d) / len(batch.domains)
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
