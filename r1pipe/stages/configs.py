"""Every built-in stage's typed config, and nothing heavy: validating a recipe (`r1pipe run --dry-run`)
imports neither torch nor Ray nor transformers, and no stage module.

Each dataclass is the schema of a recipe section with that `kind`; its `__post_init__` checks the values
that can be checked without running anything, so a bad recipe fails naming the key before any stage
starts. The stage functions live in the stage modules (r1pipe.stages.<module>), which import what they
need at the top; r1pipe.stages maps each kind to its config and its function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from r1pipe.data.synthetic import KINDS
from r1pipe.data.templates import TEMPLATES
from r1pipe.rewards import GRADERS, build_reward_fn
from r1pipe.rewards.readability import build_filters
from r1pipe.stages.base import StageConfig
from r1pipe.stages.sections import (
    Checkpointing, Optim, Parallelism, RLResources, SamplingResources, TrainerResources, Workers,
)
from r1pipe.vocab import ADVANTAGE_ESTIMATORS, ENGINE_BACKENDS, LOSS_AGGREGATIONS, POLICY_LOSSES, check_preset, dtype_name


# ---------------------------------------------------------------- the rollout engine's options

# What a recipe's `engine:` section may set: r1pipe.engine.LLM keyword arguments (the stage sets device and seed),
# with the types each takes; VLLMEngine (backend: vllm) takes the same names and translates them to vLLM's.
# cuda_graphs None: on exactly on CUDA; fp8: FP8 projections (docs/fp8.md); ep_size: rollout workers one engine
# spans, each holding its share of the routed experts (r1pipe.workers.generation; docs/engine.md).
ENGINE_OPTIONS: dict[str, tuple[type, ...]] = {
    "dtype": (str,), "max_num_seqs": (int,), "max_num_batched_tokens": (int,), "block_size": (int,),
    "num_blocks": (int, type(None)), "speculative_k": (int,), "max_model_len": (int, type(None)),
    "cache_memory_gb": (int, float), "cuda_graphs": (bool, type(None)), "fp8": (bool,), "ep_size": (int,),
}


def check_engine_options(options: Any, key: str = "engine") -> None:
    """A ValueError naming `key`.<option> for an option the engine does not take or a value of the wrong type."""
    for name, value in dict(options).items():
        if name not in ENGINE_OPTIONS:
            raise ValueError(f"{key}.{name}: not an engine option; expected one of {sorted(ENGINE_OPTIONS)}")
        types = ENGINE_OPTIONS[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{key}.{name}: expected {names}, got {value!r}")
        if name == "dtype":
            dtype_name(value, f"{key}.dtype")


def engine_ep_size(options: Any, backend: str = "engine", key: str = "engine") -> int:
    """The engine option ep_size (1 when unset); a ValueError naming `key`.ep_size when it is below 1 or the other
    settings rule it out: vLLM (its own expert parallelism is not driven from here), CUDA graphs (the
    expert-parallel dispatch reads its split sizes on the host)."""
    options = dict(options)
    ep_size = options.get("ep_size", 1)
    if ep_size < 1:
        raise ValueError(f"{key}.ep_size must be >= 1, got {ep_size}")
    if ep_size > 1 and backend != "engine":
        raise ValueError(f"{key}.ep_size={ep_size} with backend: {backend}: r1pipe's ep_size spans r1pipe's own engine "
                         "over several workers; vLLM splits the experts inside one engine (its enable_expert_parallel "
                         "over tensor_parallel_size x data_parallel_size GPUs), which r1pipe does not drive: use "
                         "backend: engine or ep_size: 1")
    if ep_size > 1 and options.get("cuda_graphs"):
        raise ValueError(f"{key}.cuda_graphs: true with {key}.ep_size={ep_size}: the expert-parallel dispatch reads its "
                         "split sizes on the host, which a CUDA graph cannot replay (leave cuda_graphs unset)")
    return ep_size


def check_backend(backend: Any, key: str = "backend") -> None:
    """A ValueError naming `key` unless `backend` is a rollout engine backend (ENGINE_BACKENDS)."""
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"{key}={backend!r}: choose one of {', '.join(ENGINE_BACKENDS)} (r1pipe's own engine or vLLM)")


# ---------------------------------------------------------------- stages that train in one process


# ---------------------------------------------------------------- synthetic base


WORLDS = ("r1-zero", "r1")
R1_WORLD_DEFAULTS = {"world": "r1-zero", "mix_fraction": 0.0, "mix_prob": 0.5, "code_fraction": 0.0,
                     "code_train_size": 0, "code_heldout_size": 0, "cold_start_size": 0}
R1_WORLD_FIELDS = tuple(k for k in R1_WORLD_DEFAULTS if k != "world")


def trainer_resources() -> TrainerResources:
    """pretrain's and sft's default resources: one trainer worker of 2 CPUs (as many torch threads)."""
    return TrainerResources(trainer=Workers(cpus=2.0, threads=0))


@dataclass
class PretrainConfig(StageConfig):
    kind: str = "pretrain"
    # the synthetic task (these fields, steps, batch_size, optim and mtp make the cached base's key: pretrain.base_key)
    problem_kinds: list[str] = field(default_factory=lambda: ["add", "sub"])  # "mul" too: a digit times a number
    max_digits: int = 2
    worked_fraction: float = 0.25  # share of "What is ...?" corpus completions that work the steps
    tutor_fraction: float = 0.5  # share of the corpus that asks for the steps (always worked)
    guess_correct: float = 0.15  # share of bare guesses that are right
    train_size: int = 2000  # RL prompts written to train_path
    heldout_size: int = 256  # held-out problems written to heldout_path
    valid_size: int = 0  # validation problems written to valid_path, disjoint from both and from the corpus; 0: none
    # the seed the problem splits are drawn with (None: run.seed); fixed, every run seed shares one set of held-out,
    # train and validation problems while the corpus and the model still follow run.seed (e.g. students of a teacher)
    split_seed: Optional[int] = None
    # tokenizer
    vocab_size: int = 1024  # BPE target; the model's vocab_size is the trained tokenizer's size (unused with tokenizer_path)
    # a model or tokenizer directory whose tokenizer the base uses as is instead of training a BPE (e.g.
    # `stage:teacher.model_path`: a student sharing its teacher's vocabulary, for sft.loss kl); vocab_size is then ignored
    tokenizer_path: Optional[str] = None
    tokenizer_examples: int = 20000
    # training
    steps: int = 450
    batch_size: int = 64
    mtp: bool = True  # train the MTP module too (lm_loss adds mtp_lambda * its CE)
    optim: Optim = field(default_factory=lambda: Optim(lr=3e-3, schedule="cosine", warmup_steps=30, min_lr_ratio=0.1,
                                                       weight_decay=0.1, grad_clip=1.0, betas=[0.9, 0.95]))
    resources: TrainerResources = field(default_factory=trainer_resources)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpointing = field(default_factory=lambda: Checkpointing(every=100, keep=1))
    # the base's own check on held-out problems
    eval_size: int = 256  # 0 skips it
    eval_max_tokens: int = 64
    cache_dir: Optional[str] = "~/.cache/r1pipe/tiny-base"  # None: never reuse or store a finished base
    # the R1 world (r1pipe.data.synthetic): world "r1" writes readable steps ("step 7+5=12 keep 2")
    # and enables the options below; the defaults leave the R1-Zero corpus (and its cache key) as is
    world: str = "r1-zero"  # r1-zero | r1
    mix_fraction: float = 0.0  # share of worked corpus completions that drift into a second script ...
    mix_prob: float = 0.5  # ... switching for good at each step after the first with this probability
    code_fraction: float = 0.0  # share of the corpus (and of the cold-start set) that are code tasks
    code_train_size: int = 0  # code tasks written to code_train_path (and mixed into mixed_train_path)
    code_heldout_size: int = 0
    cold_start_size: int = 0  # readable worked solutions in the R1 format, written to sft_path
    # the model this stage trains (e.g. a distillation student with a base of its own): None keeps the
    # recipe's model.preset / model.overrides; else an r1pipe DeepSeek-V3 preset (`tiny`, ...) or a dense
    # Hugging Face preset (`tiny-qwen2`, `tiny-llama`: r1pipe.causal_lm.DENSE_PRESETS, through transformers),
    # with model_overrides over it (ModelConfig fields for V3, transformers config fields for dense)
    preset: Optional[str] = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k in self.problem_kinds if k not in KINDS]
        if bad or not self.problem_kinds:
            raise ValueError(f"problem_kinds={list(self.problem_kinds)}: each must be one of {list(KINDS)}")
        if not 2 <= self.max_digits <= 6:
            raise ValueError(f"max_digits={self.max_digits}: must be in 2..6")
        for name in ("worked_fraction", "tutor_fraction", "guess_correct"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("steps", "batch_size", "heldout_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.valid_size < 0:
            raise ValueError(f"valid_size={self.valid_size}: must be >= 0")
        if self.eval_size > self.heldout_size:
            raise ValueError(f"eval_size={self.eval_size}: must be <= heldout_size={self.heldout_size}")
        if self.world not in WORLDS:
            raise ValueError(f"world={self.world!r}: choose one of {WORLDS}")
        for name in ("mix_fraction", "mix_prob", "code_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("code_train_size", "code_heldout_size", "cold_start_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.preset is None and self.model_overrides:
            raise ValueError("model_overrides: only used with a stage preset (else model.overrides applies)")
        if self.preset is not None:
            check_preset(self.preset)
        if self.world == "r1-zero":
            used = [name for name in R1_WORLD_FIELDS if getattr(self, name) != R1_WORLD_DEFAULTS[name]]
            if used:
                raise ValueError(f"{', '.join(used)}: only used with world=r1 (world is {self.world!r})")
        elif self.code_fraction > 0 and (self.code_train_size < 1 or self.code_heldout_size < 1):
            raise ValueError("code_fraction > 0 needs code_train_size >= 1 and code_heldout_size >= 1")


# ---------------------------------------------------------------- GRPO


OVERLONG_MODES = ("none", "filter", "soft")


@dataclass
class GRPOData:
    """Problems: a JSONL/Parquet/CSV file, a save_to_disk directory or a hub name (`name` or `name:split`);
    default: the earlier stages' outputs. Fields are auto-detected unless named."""

    train_path: Optional[str] = None
    heldout_path: Optional[str] = None
    split: str = "train"
    prompt_field: Optional[str] = None  # None: prompt / problem / question / instruction / ...
    answer_field: Optional[str] = None  # None: answer / final_answer / solution / ...
    id_field: Optional[str] = None
    template: str = "raw"  # raw (prompts used as written) | r1-zero | r1 | chat | auto (r1pipe.data.templates)
    heldout_size: int = 200  # first N held-out problems, scored greedily at the start and the end
    eval_every: int = 0  # also score the held-out set every N steps (0: start and end only)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: choose one of {TEMPLATES}")
        if self.heldout_size < 1:
            raise ValueError(f"heldout_size must be >= 1 (the held-out accuracy is measured at the start and the end), "
                             f"got {self.heldout_size}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


@dataclass
class Rollout:
    """What the engines sample each step, and which groups are kept."""

    prompts_per_step: int = 16
    group_size: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0  # only 1.0: truncated sampling is refused (see __post_init__)
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    engine: dict[str, Any] = field(default_factory=dict)  # r1pipe.engine.LLM options (ENGINE_OPTIONS)
    backend: str = "engine"  # engine (r1pipe.engine.LLM) | vllm (VLLMEngine: GPU, `pip install 'r1pipe[vllm]'`)
    routing_replay: bool = False  # train on the experts the engine chose (MoE log-prob agreement)
    max_staleness: int = 0  # 0: synchronous; 1: the next step's rollouts are generated while this one trains (one version old)
    partial_rollouts: bool = False  # with max_staleness 1: sync once trained; sequences in flight go on under the new weights
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal
    max_refill_rounds: int = 0  # sample this many extra rounds of prompts to refill dropped groups
    overlong: str = "none"  # none | filter (mask truncated completions) | soft (DAPO length penalty)
    overlong_cache: int = 16
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_engine_options(self.engine)
        check_backend(self.backend)
        engine_ep_size(self.engine, self.backend)
        if self.backend == "vllm":
            engine = dict(self.engine)
            if self.routing_replay:
                raise ValueError("routing_replay needs the experts the engine chose, which only r1pipe's own engine "
                                 "records: set backend: engine or routing_replay: false")
            if engine.get("speculative_k"):
                raise ValueError("engine.speculative_k > 0 with backend: vllm: vLLM's MTP drafter is not among the "
                                 "weights a sync loads and reports no draft counts; use backend: engine for MTP drafts")
            if engine.get("fp8"):
                raise ValueError("engine.fp8 with backend: vllm: vLLM quantizes to FP8 when it loads the checkpoint, "
                                 "not the weights a sync loads; use backend: engine for FP8 rollouts")
            if self.partial_rollouts:
                raise ValueError("partial_rollouts with backend: vllm: vLLM cannot take weights in the middle of a "
                                 "generation; use backend: engine or partial_rollouts: false")
        if self.top_p != 1.0:
            raise ValueError(
                f"top_p={self.top_p}: GRPO samples from the full tempered distribution (top_p: 1.0). Truncated "
                "sampling makes the behaviour policy the truncated one while the trainer's log-probs are not, so "
                "every ratio would be silently off-policy")
        for name in ("prompts_per_step", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples a group per prompt), got {self.temperature}")
        if self.max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 (synchronous) or 1 (one batch generated while the trainer "
                             f"trains), got {self.max_staleness}")
        if self.partial_rollouts and int(dict(self.engine).get("ep_size", 1)) > 1:
            raise ValueError("partial_rollouts with engine.ep_size > 1: the processes of an expert-parallel engine "
                             "would have to take new weights at the same engine step; set one of them off")
        if self.partial_rollouts and self.max_staleness < 1:
            raise ValueError("partial_rollouts: true needs max_staleness: 1 (it lets the rollouts sampled while the "
                             "trainer trains go on under the new weights); set max_staleness: 1 or partial_rollouts: false")
        if self.max_refill_rounds < 0:
            raise ValueError(f"max_refill_rounds must be >= 0, got {self.max_refill_rounds}")
        if self.overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong={self.overlong!r}: choose one of {OVERLONG_MODES}")
        if self.overlong == "soft" and not 0 < self.overlong_cache <= self.max_tokens:
            raise ValueError(f"overlong_cache must be in 1..max_tokens={self.max_tokens}, got {self.overlong_cache}")


@dataclass
class Algorithm:
    """The update: advantages, the surrogate loss and its clipping, KL, importance weights, the drafter."""

    advantage: str = "grpo"  # grpo | dr-grpo (no std division) | rloo (leave-one-out) | reinforce++ (global batch norm)
    loss: str = "grpo"  # grpo (token ratio clip) | gspo (sequence ratio clip) | cispo (clipped IS weight, every token's gradient)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO)
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # 0 disables the KL term and drops the reference model
    updates_per_step: int = 1  # optimizer steps (mini-batches) per rollout batch
    micro_batch_size: int = 32
    skip_zero_advantage: bool = True  # rows of all-equal groups skip forward and backward (same gradient; kl_coef 0, no draft loss)
    share_prompts: bool = True  # the trainer runs a group's shared prompt once, its rows packed (same log-probs; not with draft_loss)
    tis: Optional[bool] = None  # truncated importance sampling; None: on iff engine.dtype is not float32, engine.fp8, max_staleness > 0 or backend vllm
    tis_cap: float = 2.0  # C in min(pi_old / pi_engine, C)
    draft_loss: Optional[bool] = None  # keep the MTP drafter fresh; None: on iff rollout.engine.speculative_k > 0
    draft_lr_scale: float = 10.0  # the MTP module's learning rate is optim.lr x this: it chases a moving policy, and its
    # chained depths (drafts fed the drafter's own hidden state) are first trained here, pretraining trains depth 1 only
    bias_update_gamma: Optional[float] = None  # None: the model config's gamma
    freeze_router_bias: bool = False  # hold the routers' balancing bias still during RL (MaxVio still logged)

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage={self.advantage!r}: choose one of {ADVANTAGE_ESTIMATORS}")
        if self.loss not in POLICY_LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {POLICY_LOSSES}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg={self.loss_agg!r}: choose one of {LOSS_AGGREGATIONS}")
        for name in ("updates_per_step", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        if self.draft_lr_scale <= 0:
            raise ValueError(f"draft_lr_scale must be > 0, got {self.draft_lr_scale}")


@dataclass
class Rewards:
    """What a completion scores (r1pipe.rewards)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    extra: dict[str, float] = field(default_factory=dict)  # "module:function" -> weight; fn(text, reference) -> float
    accuracy_reward: str = "accuracy"  # the reward component (> 0.5 = solved) behind accuracy metrics
    options: dict[str, Any] = field(default_factory=dict)  # r1pipe.rewards.RewardOptions fields, e.g. {extract_mode: boxed}


@dataclass
class Sync:
    """Weight sync from the trainers to the engines (r1pipe.workers.weight_sync), and its check."""

    bucket_mb: float = 64.0  # broadcast bucket size
    shared_memory: bool = True  # CPU workers on one machine: weight sync and replicas' gradient sums through shared memory
    check_every: int = 10  # probe the engines after the first sync and every N steps (0: never)
    check_tol: Optional[float] = None  # max mean |trainer - engine| probe log-prob after a sync; None: 0.1 with TIS on, else 1e-3

    def __post_init__(self) -> None:
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if self.check_every < 0:
            raise ValueError(f"check_every must be >= 0, got {self.check_every}")


@dataclass
class GRPOConfig(StageConfig):
    """GRPO on Ray: rollout engines sample, reward workers score, trainer workers update the policy
    (r1pipe.stages.grpo). The same recipe scales out with cluster.address=auto."""

    kind: str = "grpo"
    model_path: Optional[str] = None  # the policy's start: default the newest earlier stage's model, else model.path
    steps: int = 40
    data: GRPOData = field(default_factory=GRPOData)
    rollout: Rollout = field(default_factory=Rollout)
    algorithm: Algorithm = field(default_factory=Algorithm)
    rewards: Rewards = field(default_factory=Rewards)
    optim: Optim = field(default_factory=lambda: Optim(lr=1e-4, betas=[0.9, 0.99]))  # constant lr
    resources: RLResources = field(default_factory=RLResources)
    parallelism: Parallelism = field(default_factory=Parallelism)
    sync: Sync = field(default_factory=Sync)
    checkpoint: Checkpointing = field(default_factory=lambda: Checkpointing(every=10, keep=2))

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        engine = dict(self.rollout.engine)
        if self.algorithm.tis is False and engine.get("fp8"):
            raise ValueError("algorithm.tis: false with rollout.engine.fp8: true: FP8 rollouts keep accuracy only with "
                             "token-level TIS correcting the trainer/engine mismatch; leave tis unset (on) or true")
        if self.rollout.max_staleness and self.algorithm.tis is False:
            raise ValueError("algorithm.tis: false with rollout.max_staleness: 1, which trains on rollouts of the previous "
                             "policy, corrected by truncated importance sampling: tis cannot be false")


# ---------------------------------------------------------------- supervised fine-tuning


LOSSES = ("ce", "kl", "ce+kl")


@dataclass
class SFTData:
    """Training examples: a JSONL/Parquet/CSV file, a save_to_disk directory or a hub name (`name` or
    `name:split`) of prompt + response (or chat messages) rows."""

    train_path: Optional[str] = None  # default: the newest earlier stage output `sft_path`
    heldout_path: Optional[str] = None  # default: a heldout_fraction of train_path, set aside
    split: str = "train"
    heldout_fraction: float = 0.05
    heldout_max: int = 256
    prompt_field: Optional[str] = None  # None: auto-detected (prompt / problem / question / instruction)
    response_field: Optional[str] = None  # None: auto-detected (response / completion / output / solution / answer)
    messages_field: Optional[str] = None  # None: auto-detected (messages / conversations)
    id_field: Optional[str] = None
    template: str = "auto"  # auto | r1-zero | r1 | chat | raw (r1pipe.data.templates)
    max_length: int = 0  # longest sequence kept; 0: the model's context
    truncate: bool = False  # an example longer than max_length: false skips it, true cuts it to max_length

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: choose one of {TEMPLATES}")
        for name in ("max_length", "heldout_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class SFTConfig(StageConfig):
    kind: str = "sft"
    model_path: Optional[str] = None  # where to start: default the newest earlier stage's model, else model.path
    data: SFTData = field(default_factory=SFTData)
    # loss: ce (next-token cross-entropy on the data), kl (logit distillation: forward KL to the
    # teacher's token distribution), ce+kl (ce + kl_weight * kl); kl needs a teacher with the same tokenizer
    loss: str = "ce"
    teacher_path: Optional[str] = None
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    mtp: bool = True  # r1pipe V3 with MTP modules: train them too (lambda from the model config)
    # steps
    epochs: int = 1
    steps: int = 0  # > 0: exactly this many optimizer steps (epochs repeat as needed)
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation)
    eval_every: int = 0  # validation loss every N steps (always at the start and the end)
    optim: Optim = field(default_factory=lambda: Optim(lr=1e-4, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                                                       betas=[0.9, 0.95]))
    resources: TrainerResources = field(default_factory=trainer_resources)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpointing = field(default_factory=lambda: Checkpointing(every=50, keep=2))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} exceeds batch_size={self.batch_size}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {LOSSES}")
        if self.loss != "ce" and not self.teacher_path:
            raise ValueError(f"loss={self.loss!r} needs teacher_path (a checkpoint sharing the student's tokenizer)")
        if not self.kl_temperature > 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")



# ---------------------------------------------------------------- rejection sampling


SELECT_MODES = ("first", "shortest", "diverse")
DEFAULT_FILTERS: dict[str, dict] = {"language_consistency": {"min_share": 0.95}, "no_mixed_scripts": {}, "length": {},
                                    "paragraph_length": {}, "no_repeated_paragraphs": {}, "no_code_in_math": {}}
DEFAULT_REWARDS: dict[str, float] = {"accuracy": 1.0, "code": 1.0, "format": 0.1, "language": 0.1}


@dataclass
class RejectionSampleConfig(StageConfig):
    kind: str = "rejection_sample"
    # prompts: a JSONL/Parquet/CSV file, a save_to_disk directory or a hub name; default: the
    # newest earlier stage output `prompts_from` (e.g. train_path or mixed_train_path)
    prompts_path: Optional[str] = None
    prompts_from: str = "train_path"
    split: str = "train"
    prompt_field: Optional[str] = None
    answer_field: Optional[str] = None
    id_field: Optional[str] = None
    template: str = "r1-zero"  # how prompts are rendered for sampling (r1pipe.data.templates)
    limit: int = 0  # first N usable prompts (0: all)
    # the checkpoint sampled: default the newest earlier stage's model, else model.path
    model_path: Optional[str] = None
    # sampling
    k: int = 4  # samples per prompt
    temperature: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    # selection
    max_per_prompt: int = 2  # m: samples kept per prompt
    select: str = "first"  # first | shortest (shortest correct) | diverse (farthest-first on character trigrams)
    # readability filters by name -> parameters (r1pipe.rewards.readability); None: DEFAULT_FILTERS, {}: none
    filters: Optional[dict[str, Any]] = None
    # rewards: all are scored and recorded; the row's grader (accuracy / code) decides correctness.
    # None: DEFAULT_REWARDS (a recipe's mapping replaces it whole)
    reward_weights: Optional[dict[str, float]] = None
    reward_options: dict[str, Any] = field(default_factory=dict)
    # engines and workers
    shard_size: int = 64  # prompts per shard (and per generation call)
    engine: dict[str, Any] = field(default_factory=dict)  # r1pipe.engine.LLM options (ENGINE_OPTIONS)
    backend: str = "engine"  # engine (r1pipe.engine.LLM) | vllm (VLLMEngine: GPU, `pip install 'r1pipe[vllm]'`)
    resources: SamplingResources = field(default_factory=SamplingResources)

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.filters is None:
            self.filters = dict(DEFAULT_FILTERS)
        if self.reward_weights is None:
            self.reward_weights = dict(DEFAULT_REWARDS)
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: choose one of {TEMPLATES}")
        if self.select not in SELECT_MODES:
            raise ValueError(f"select={self.select!r}: choose one of {SELECT_MODES}")
        check_engine_options(self.engine)
        engine_ep_size(self.engine, self.backend)
        for name in ("k", "max_tokens", "max_per_prompt", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not any(g in self.reward_weights for g in GRADERS):
            raise ValueError(f"reward_weights={dict(self.reward_weights)}: needs a grader ({' or '.join(GRADERS)})")
        build_filters({k: dict(v or {}) for k, v in self.filters.items()})
        build_reward_fn(dict(self.reward_weights), **dict(self.reward_options))


# ---------------------------------------------------------------- scorecard


@dataclass
class ScorecardConfig(StageConfig):
    kind: str = "scorecard"
    heldout_path: Optional[str] = None  # default: the newest earlier output `heldout_from`
    heldout_from: str = "mixed_heldout_path"
    per_domain: int = 128  # first N held-out rows of each domain
    models: list[str] = field(default_factory=list)  # stage names; []: every earlier stage with a model_path
    template: str = "r1-zero"
    max_tokens: int = 64
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    reward_weights: Optional[dict[str, float]] = None  # None: accuracy, code, format, language
    reward_options: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 64  # prompts per generation call
    resources: SamplingResources = field(default_factory=SamplingResources)  # rollout engines sample, reward workers score

    def __post_init__(self) -> None:
        if self.reward_weights is None:
            self.reward_weights = {"accuracy": 1.0, "code": 1.0, "format": 0.1, "language": 0.1}
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: choose one of {TEMPLATES}")
        for name in ("per_domain", "max_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalConfig(StageConfig):
    kind: str = "eval"
    suites: list[str] = field(default_factory=lambda: ["heldout"])
    # the file the `heldout` suite reads (e.g. stage:pretrain.heldout_path); default: the newest earlier stage output
    # heldout_path, which after a grpo stage is the set that stage checked itself on
    heldout_path: Optional[str] = None
    model_path: Optional[str] = None  # default: the newest earlier stage's model, else model.path
    k: int = 1  # samples per problem (pass@1 is averaged over them)
    greedy: bool = True
    temperature: float = 0.6  # the R1 paper's evaluation setting, when not greedy
    top_p: float = 0.95
    max_tokens: int = 4096
    template: str = "r1-zero"  # r1pipe.data.templates: auto | r1-zero | r1 | chat | raw
    limit: Optional[int] = None  # first N problems of each suite
    pass_at: list[int] = field(default_factory=list)
    backend: str = "engine"  # engine (r1pipe's own) | vllm
    workers: int = 1  # generation workers (Ray actors; on GPUs one GPU each)

    def __post_init__(self) -> None:
        if not self.suites:
            raise ValueError("suites: give at least one suite")
        if self.k < 1:
            raise ValueError(f"k={self.k}: must be >= 1")
        if self.greedy and self.k != 1:
            raise ValueError(f"k={self.k}: greedy decoding gives one sample per problem, use k=1 or greedy=false")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.backend not in ENGINE_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {', '.join(ENGINE_BACKENDS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


# ---------------------------------------------------------------- distillation: teacher and comparison


@dataclass
class TeacherConfig(StageConfig):
    kind: str = "teacher"
    model_path: Optional[str] = None  # a checkpoint used as is
    runs: list[str] = field(default_factory=lambda: ["runs/r1", "runs/r1-zero"])  # finished runs, first wins
    recipe: str = "r1-zero"  # trained when no run in `runs` has finished
    run_dir: str = "runs/r1-zero"
    overrides: list[str] = field(default_factory=list)  # key=value overrides for `recipe`


@dataclass
class CompareConfig(StageConfig):
    kind: str = "compare"
    rows: dict[str, str] = field(default_factory=dict)  # label -> name of an earlier eval stage
    suite: str = "heldout"
    reference: Optional[str] = None  # a label: the others' difference to it in points
    # an RL row's label -> an SFT row's label: checks the RL model trained with at least the SFT model's
    # optimizer steps and tokens (sampled against trained), warning when it did not
    budgets: dict[str, str] = field(default_factory=dict)
    # pairs [a, b] of labels: a's pass@1 minus b's, paired over the problems both eval stages scored, with a
    # 95% interval and the sign-test p-value (r1pipe.eval.stats)
    margins: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("rows: name at least one eval stage (label: stage)")
        labels = ", ".join(self.rows)
        if self.reference is not None and self.reference not in self.rows:
            raise ValueError(f"reference={self.reference!r}: not a label of rows ({labels})")
        for rl, sft in self.budgets.items():
            for label in (rl, sft):
                if label not in self.rows:
                    raise ValueError(f"budgets.{rl}={sft!r}: {label!r} is not a label of rows ({labels})")
        for i, pair in enumerate(self.margins):
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"margins[{i}]={list(pair)}: a pair [a, b] of two different labels of rows")
            for label in pair:
                if label not in self.rows:
                    raise ValueError(f"margins[{i}]={list(pair)}: {label!r} is not a label of rows ({labels})")


# ---------------------------------------------------------------- keys that moved into sections


def _into(section: str, *names: str) -> dict[str, tuple[str, ...]]:
    return {name: (f"{section}.{name}",) for name in names}


_OPTIM = _into("optim", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip")
_CHECKPOINT = {"checkpoint_every": ("checkpoint.every",), "keep_checkpoints": ("checkpoint.keep",)}
_TRAINER = {"num_threads": ("resources.trainer.threads",), "num_workers": ("resources.trainer.workers",),
            "cpus_per_worker": ("resources.trainer.cpus",)}

# kind -> old flat key -> its new key(s): r1pipe.config refuses the old ones, naming the new
MOVED_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "grpo": {
        **_into("data", "train_path", "heldout_path", "split", "prompt_field", "answer_field", "id_field", "template",
                "heldout_size", "eval_every"),
        **_into("rollout", "prompts_per_step", "group_size", "max_tokens", "temperature", "top_p", "stop", "engine",
                "routing_replay", "max_staleness", "dynamic_sampling", "max_refill_rounds", "overlong", "overlong_cache",
                "overlong_penalty"),
        **_into("algorithm", "advantage", "loss", "loss_agg", "clip_low", "clip_high", "kl_coef", "updates_per_step",
                "micro_batch_size", "skip_zero_advantage", "share_prompts", "tis", "tis_cap", "draft_loss",
                "draft_lr_scale", "bias_update_gamma", "freeze_router_bias"),
        "reward_weights": ("rewards.weights",), "extra_rewards": ("rewards.extra",),
        "accuracy_reward": ("rewards.accuracy_reward",), "reward_options": ("rewards.options",),
        **_OPTIM,
        "num_policy_workers": ("resources.trainer.workers",), "num_rollout_workers": ("resources.rollout.workers",),
        "num_reward_workers": ("resources.reward.workers",),
        "cpus_per_worker": ("resources.trainer.cpus", "resources.rollout.cpus"),
        "gpus_per_worker": ("resources.trainer.gpus", "resources.rollout.gpus"),
        "threads_per_worker": ("resources.trainer.threads", "resources.rollout.threads"),
        "policy_cpus": ("resources.trainer.cpus",), "policy_gpus": ("resources.trainer.gpus",),
        "rollout_cpus": ("resources.rollout.cpus",), "rollout_gpus": ("resources.rollout.gpus",),
        "reward_cpus": ("resources.reward.cpus",),
        "policy_resources": ("resources.trainer.custom",), "rollout_resources": ("resources.rollout.custom",),
        **_into("resources", "device", "placement_strategy", "placement_timeout_s"),
        **_into("parallelism", "fsdp", "fsdp_keep_gathered", "activation_checkpointing"),
        "sync_bucket_mb": ("sync.bucket_mb",), "shared_memory": ("sync.shared_memory",),
        "sync_check_every": ("sync.check_every",), "sync_check_tol": ("sync.check_tol",),
        **_CHECKPOINT,
    },
    "sft": {
        **_into("data", "train_path", "heldout_path", "split", "heldout_fraction", "heldout_max", "prompt_field",
                "response_field", "messages_field", "id_field", "template", "max_length"),
        **_OPTIM, **_CHECKPOINT, **_TRAINER,
        "device": ("resources.device",),
    },
    "pretrain": {
        **_OPTIM, "checkpoint_every": ("checkpoint.every",), **_TRAINER,
    },
    "rejection_sample": {
        "num_rollout_workers": ("resources.rollout.workers",), "num_reward_workers": ("resources.reward.workers",),
        "cpus_per_worker": ("resources.rollout.cpus", "resources.reward.cpus"),
        "gpus_per_worker": ("resources.rollout.gpus",), "threads_per_worker": ("resources.rollout.threads",),
        "device": ("resources.device",),
    },
    "scorecard": {
        "num_reward_workers": ("resources.reward.workers",),
        "cpus_per_worker": ("resources.rollout.cpus", "resources.reward.cpus"),
        "threads_per_worker": ("resources.rollout.threads",), "device": ("resources.device",),
    },
}
