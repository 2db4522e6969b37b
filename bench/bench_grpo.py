"""One GRPO step end to end (rollout, reward, train, sync), split by phase, against TRL's GRPOTrainer;
with --heldout-every, also held-out accuracy against training time.

Both train the same tiny DeepSeek-V3 on the same R1-Zero arithmetic prompts, in the same order, with
the same reward (r1pipe's R1-Zero reward, accuracy + 0.1 format, called as a plain function by both),
group size, completion length, completions ending at `</answer>` as in the R1-Zero recipe (r1pipe's stop
string; TRL's generate takes no stop strings, so its generation config lists the ` </answer>` token as a
second EOS id), sampling temperature 1, no KL, one update per batch, constant learning rate 1e-4, AdamW
betas (0.9, 0.99), clip range 0.2 / 0.28, the same compute dtype (`--dtype`: fp32, or bf16 autocast over fp32
master weights for both) and the same torch thread count. TRL's own defaults are bf16 autocast and
gradient checkpointing; checkpointing is off here, as r1pipe does not use it.

The model is a randomly initialised one (tests/tiny_models.make_tiny_v3, built locally, `--shape` tiny or
issue 12's 1.7B DeepSeek-V3 shape with the tokenizer's small vocabulary: every completion runs to the
length limit), or with `--base` the R1-Zero recipe's pretrained base and its training prompts
(completions stop at `</answer>` or EOS as in the real run). `--device cuda` puts both on one GPU. r1pipe runs its `grpo` stage (Ray workers, dynamic
sampling off: the same samples and the same update as TRL; rows whose group's rewards are all equal have zero
advantage and hence zero gradient, and r1pipe leaves them out of the forward and backward unless
`--keep-zero-advantage`); phases are its own time/* metrics. TRL's step is timed by a
callback; its rollout is `_generate`, its reward the reward function's own time, its train the rest.
Medians over the steps after the first.

`--workers N` runs N policy and N rollout workers with --threads / N torch threads each, on the same cores
(`--sharding`: FSDP2, FSDP2 gathering once per step, or replicas); TRL keeps one process of --threads threads.

`--pin-cores` (CPU, one worker per role): the trainer's process on core 0 and the engine's on core 1, one torch
thread each, every thread of each pinned (found by Ray's process titles, `ray::PolicyWorker...`,
`ray::RolloutWorker...`, re-checked every half second): the layout of a cluster where trainer and engines have
devices of their own, so overlapping them (--max-staleness 1) can pay off. Reward workers, the driver and TRL
stay unpinned.

`--heldout-every N` (with `--base`) evaluates greedy pass@1 on the base's held-out problems every N
steps, outside the clock, for three runs: TRL, r1pipe at the same work, and r1pipe with dynamic sampling
(its R1-Zero setting: groups whose rewards are all equal are not trained on). r1pipe's runs use their
own held-out evaluation; TRL's model is evaluated by the same engine and reward (its weights copied into
an r1pipe engine). It prints the training seconds to 50%, 80% and 90% and draws the curves (`--png`).

Without it, also measured in-process on one PolicyWorker and the same batch shape: the train phase with
a separate forward for the old log-probs (what r1pipe did before) against the update's own detached
forward (what it does now with updates_per_step == 1). Last line: a JSON object with the figures.

    python bench/bench_grpo.py                       # CPU: 8 prompts x 4, 32 tokens, 4 steps
    python bench/bench_grpo.py --device cuda --shape 1.7b --dtype bfloat16 --prompts 32 --group 8 --max-tokens 64 \
        --steps 6 --micro-batch 64                   # the 1.7B shape on one GPU (not run on a GPU yet)
    python bench/bench_grpo.py --prompts 32 --group 8 --max-tokens 64 --steps 10
    python bench/bench_grpo.py --base runs/r1-zero/pretrain --prompts 32 --group 8 --max-tokens 64 --steps 10
    python bench/bench_grpo.py --base runs/r1-zero/pretrain --prompts 32 --group 8 --max-tokens 64 --steps 100 \
        --heldout-every 5                            # time to 90% held-out, ~5 minutes on 2 cores
    python bench/bench_grpo.py --base runs/r1-zero/pretrain --prompts 32 --group 8 --max-tokens 64 --steps 100 \
        --heldout-every 5 --workers 2 --sharding replicas   # the r1-zero recipe's layout: 2 + 2 workers, a thread each
    python bench/bench_grpo.py --base runs/r1-zero/pretrain --prompts 32 --group 8 --max-tokens 64 --steps 30 \
        --max-staleness 1 --pin-cores                       # trainer and engine on a core each: sync against async
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_tiny_v3, write_worked_solutions  # noqa: E402

from r1pipe.data.jsonl import read_jsonl, write_jsonl  # noqa: E402
from r1pipe.data.tokenizer import load_tokenizer  # noqa: E402
from r1pipe.data.templates import r1_zero_prompt  # noqa: E402
from r1pipe.model import Precision  # noqa: E402
from r1pipe.rewards import build_reward_fn  # noqa: E402
from r1pipe.stages.base import StageContext  # noqa: E402
from r1pipe.stages.base_eval import share_solved  # noqa: E402
from r1pipe.config import make_config  # noqa: E402
from r1pipe.stages.configs import GRPOConfig  # noqa: E402
from r1pipe.stages.grpo import run_grpo  # noqa: E402
from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch  # noqa: E402
from r1pipe.workers.rollout import RolloutWorker  # noqa: E402

_REWARD = build_reward_fn({"accuracy": 1.0, "format": 0.1})  # the R1-Zero recipe's reward
R1_ZERO_MICRO_BATCH = int(OmegaConf.load(Path(__file__).resolve().parent.parent / "recipes" / "r1-zero.yaml").rl.algorithm.micro_batch_size)
REWARD_SECONDS = [0.0]


def reward(text: str, reference: dict) -> float:
    """The reward both trainers use: r1pipe's R1-Zero reward (accuracy + 0.1 format) of one completion
    (timed). Above 0.5 exactly when the answer is right, which is how accuracy is counted (share_solved)."""
    t = time.perf_counter()
    value = float(_REWARD(text, reference).total)
    REWARD_SECONDS[0] += time.perf_counter() - t
    return value


PHASES = ("rollout", "reward", "train", "sync", "step")
IDLE = ("trainer_idle", "engine_idle")  # seconds of a step each side waited for the other
STOP = "</answer>"  # completions end there (the R1-Zero recipe's rl.rollout.stop) or at EOS
Curve = list[tuple[float, float]]  # (training seconds so far, greedy held-out accuracy)


class CorePinning:
    """While open, every thread of the trainer's processes runs on core 0 and of the engines' on core 1 (found by
    Ray's process titles; re-applied every half second, as processes and threads come and go)."""

    CORES = {"ray::PolicyWorker": 0, "ray::RolloutWorker": 1}

    def __init__(self, enabled: bool):
        self.enabled, self.stop, self.pinned = enabled, threading.Event(), set()

    def __enter__(self) -> "CorePinning":
        if self.enabled:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    core = next((c for prefix, c in self.CORES.items() if title.startswith(prefix)), None)
                    if core is None:
                        continue
                    for task in (proc / "task").iterdir():
                        os.sched_setaffinity(int(task.name), {core})
                    self.pinned.add((title.split(".")[0].split(" ")[0], core))
                except (OSError, ValueError):  # the process or thread ended meanwhile
                    continue


def r1pipe_run(model: Path, data: Path, args, root: Path, dynamic_sampling: bool = False,
               heldout: Path | None = None, max_staleness: int = 0) -> tuple[dict[str, float], Curve]:
    """r1pipe's grpo stage: median phase seconds after step 1 (and the trainer's and engines' idle seconds)
    and, with `heldout`, its held-out curve (its own greedy evaluation every --heldout-every steps;
    evaluation time is not training time)."""
    # each role: --workers workers with threads / workers torch threads; the roles take turns on the same cores
    # (0.5 CPU each in all) and, on cuda, share the one GPU
    workers = {"workers": args.workers, "cpus": 0.5 / args.workers,
               "threads": 1 if args.pin_cores else args.threads // args.workers,
               "gpus": 0.5 / args.workers if args.device == "cuda" else 0.0}
    cfg = make_config(GRPOConfig, {
        "steps": args.steps,
        "data": {"train_path": str(data), "heldout_path": str(heldout or data), "heldout_size": args.heldout if heldout else 2,
                 "eval_every": args.heldout_every if heldout else 10**6, "template": "raw"},
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group, "max_tokens": args.max_tokens,
                    "stop": stop_strings(model), "dynamic_sampling": dynamic_sampling, "max_staleness": max_staleness},
        "rewards": {"weights": {}, "extra": {f"{__name__}:reward": 1.0}, "accuracy_reward": "reward"},
        "algorithm": {"skip_zero_advantage": not args.keep_zero_advantage, "micro_batch_size": args.micro_batch},
        "optim.lr": 1e-4, "checkpoint.every": 10**6,
        "resources": {"device": args.device, "trainer": workers, "rollout": workers},
        "parallelism": {"fsdp": args.sharding != "replicas", "fsdp_keep_gathered": args.sharding == "fsdp-keep-gathered"},
    }, "rl")
    recipe = OmegaConf.create({"cluster": {"address": None, "num_cpus": 2, "num_gpus": int(args.device == "cuda")},
                               "model": {"path": str(model), "dtype": args.dtype}})
    with CorePinning(args.pin_cores) as pinning:
        run_grpo(cfg, StageContext(run_dir=root, stage_dir=root / "rl", recipe=recipe, seed=0))
    if args.pin_cores and {c for _, c in pinning.pinned} != {0, 1}:
        raise SystemExit(f"--pin-cores: found and pinned only {sorted(pinning.pinned)}")
    rows = [json.loads(line) for line in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        r["time/step"] -= r.get("time/heldout", 0.0)
    phases = {k: statistics.median(r[f"time/{k}"] for r in rows[2:]) for k in PHASES + IDLE}  # after step 1
    curve, seconds = [], 0.0
    for r in rows:
        seconds += r["time/step"] if r["step"] > 0 else 0.0
        if "heldout_accuracy" in r:
            curve.append((seconds, r["heldout_accuracy"]))
    return phases, curve


@functools.cache
def stop_token(model: Path) -> int | None:
    """The token that ends a completion at STOP, or None where the tokenizer has no single token for it (the
    random model: both then stop at EOS only). TRL's generate takes no stop strings but stops at any of the
    generation config's EOS ids, so it gets this token as a second one; r1pipe stops at the string."""
    ids = load_tokenizer(model).encode(" " + STOP)
    return ids[0] if len(ids) == 1 else None


def stop_strings(model: Path) -> list[str]:
    """r1pipe's stop strings for `model`: STOP where TRL can stop there too (stop_token), else none."""
    return [STOP] if stop_token(model) is not None else []


class GreedyHeldout:
    """Held-out accuracy of a transformers model, evaluated as r1pipe's GRPO stage evaluates its own: an
    r1pipe rollout worker (built once from the base) generates greedily with the same stop and length, and the
    same reward grades. The model's weights reach it saved in the Hugging Face layout."""

    def __init__(self, base: Path, rows: list[dict], args):
        self.worker = RolloutWorker(str(base), {"dtype": args.dtype, "device": args.device}, seed=0,
                                    num_threads=args.threads)
        self.rows, self.max_tokens = rows, args.max_tokens
        self.stop = stop_strings(base)

    def __call__(self, hf_model) -> float:  # share of held-out problems solved
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            self.worker.update_weights({k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(f).items()})
        groups = self.worker.generate([r["prompt"] for r in self.rows], 1, 0.0, self.max_tokens, [0] * len(self.rows), self.stop)
        return share_solved([reward(g[0].text, {"answer": r["answer"]}) for g, r in zip(groups, self.rows)])


def trl_run(model: Path, data: Path, args, root: Path, heldout: Path | None = None
            ) -> tuple[dict[str, float], Curve]:
    """TRL's GRPOTrainer on the same model, prompts (in order), reward and settings: median phase seconds
    after step 1 and, with `heldout`, its held-out curve (evaluated by GreedyHeldout outside the clock)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    rows = read_jsonl(data)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    steps: list[dict[str, float]] = []
    clock = {"generate": 0.0}

    def trl_reward(prompts, completions, answer, **_):
        return [reward(c, {"answer": a}) for c, a in zip(completions, answer)]

    evaluate = GreedyHeldout(model, read_jsonl(heldout)[: args.heldout], args) if heldout else None
    curve: Curve = []

    class Phases(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            if evaluate is not None:
                curve.append((0.0, evaluate(model)))

        def on_step_begin(self, a, state, control, **kw):
            self.t0, clock["generate"], REWARD_SECONDS[0] = time.perf_counter(), 0.0, 0.0

        def on_step_end(self, a, state, control, model=None, **kw):
            step = time.perf_counter() - self.t0
            steps.append({"rollout": clock["generate"], "reward": REWARD_SECONDS[0], "step": step,
                          "train": step - clock["generate"] - REWARD_SECONDS[0], "sync": 0.0})
            if evaluate is not None and (state.global_step % args.heldout_every == 0 or state.global_step == args.steps):
                curve.append((sum(s["step"] for s in steps), evaluate(model)))

    config = TRLConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=args.max_tokens, max_steps=args.steps,
                       temperature=1.0, beta=0.0, num_iterations=1, learning_rate=1e-4, use_cpu=args.device == "cpu", report_to=[],
                       lr_scheduler_type="constant", adam_beta2=0.99, epsilon_high=0.28,  # r1pipe's optimiser and clip
                       bf16=args.dtype == "bfloat16", gradient_checkpointing=False,
                       save_strategy="no", logging_steps=10**6, shuffle_dataset=False, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(str(model))
    if (stop := stop_token(model)) is not None:  # TRL stops at any of these
        policy.generation_config.eos_token_id = [policy.config.eos_token_id, stop]
    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_reward], args=config, train_dataset=dataset, callbacks=[Phases()])
    generate = trainer._generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            clock["generate"] += time.perf_counter() - t

    trainer._generate = timed_generate
    trainer.train()
    return {k: statistics.median(s[k] for s in steps[1:]) for k in PHASES}, curve


def old_logprob_forward_effect(model: Path, args) -> dict[str, float]:
    """Train-phase seconds with a separate old-log-prob forward vs the update's own (median of 3)."""
    g = torch.Generator().manual_seed(0)
    rows = args.prompts * args.group
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    batch = build_batch([torch.randint(3, vocab, (24,), generator=g).tolist() for _ in range(rows)],
                        [torch.randint(3, vocab, (args.max_tokens,), generator=g).tolist() for _ in range(rows)], pad_id=0)
    adv = torch.randn(rows, generator=g)
    worker = PolicyWorker(0, 1, str(model), PolicyConfig(lr=1e-6, micro_batch_size=args.micro_batch,
                                                         num_threads=args.threads, device=args.device,
                                                         precision=Precision.from_section({"dtype": args.dtype})))
    n_tok = float(batch.response_mask.sum())

    def separate():
        worker.train_step(batch, worker.logprobs(batch), adv, None, n_tok, float(rows))

    def fused():
        worker.train_step(batch, None, adv, None, n_tok, float(rows))

    out = {}
    for name, fn in (("separate", separate), ("fused", fused)):
        fn()  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


# random models (the tokenizer's own small vocabulary): the test-sized default, and issue 12's ~1.7B DeepSeek-V3 shape
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": {},
    "1.7b": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1, n_routed_experts=32, n_group=4,
                 topk_group=4, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=768,
                 qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_nextn_predict_layers=0),
}


def problems(args, root: Path) -> tuple[Path, Path]:
    """(model directory, JSONL of R1-Zero prompts with answers) for the run: the base's own, or a random
    model of --shape and freshly generated problems."""
    data = root / "problems.jsonl"
    wanted = args.prompts * (args.steps + 1)
    if args.base is not None:
        rows = read_jsonl(args.base / "train.jsonl")[:wanted]
        write_jsonl(data, [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        return args.base / "model", data
    model = make_tiny_v3(root / "model", **RANDOM_SHAPES[args.shape])
    source = read_jsonl(write_worked_solutions(root / "src.jsonl", wanted))
    write_jsonl(data, [{"id": r["id"], "prompt": r1_zero_prompt(r["problem"]), "answer": r["answer"]} for r in source])
    return model, data


def time_to(curve: Curve, share: float) -> float | None:
    """Training seconds at the first evaluation reaching `share` held-out accuracy (None: never)."""
    return next((t for t, acc in curve if acc >= share), None)


def plot_curves(curves: dict[str, Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([t for t, _ in curve], [100 * a for _, a in curve], marker="o", markersize=3, label=name)
    ax.axhline(90, color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlabel="training seconds (held-out evaluation excluded)", ylabel="greedy held-out accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each trainer in all (the cores they share)")
    p.add_argument("--workers", type=int, default=1,
                   help="r1pipe's policy workers and rollout workers (each role N, with threads / N torch threads each)")
    p.add_argument("--sharding", choices=("fsdp", "fsdp-keep-gathered", "replicas"), default="fsdp",
                   help="with --workers > 1: the policy workers' rl.parallelism.fsdp / fsdp_keep_gathered (replicas: fsdp false)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: both trainers on the one GPU (r1pipe's policy and rollout workers take half of it each)")
    p.add_argument("--shape", choices=tuple(RANDOM_SHAPES), default="tiny", help="the random model's shape (without --base)")
    p.add_argument("--micro-batch", type=int, default=R1_ZERO_MICRO_BATCH,
                   help=f"r1pipe's training micro-batch rows (default: the r1-zero recipe's rl.algorithm.micro_batch_size, "
                        f"{R1_ZERO_MICRO_BATCH}; TRL trains each batch in one pass)")
    p.add_argument("--keep-zero-advantage", action="store_true",
                   help="r1pipe runs rows with zero advantage through forward and backward as TRL does (rl.algorithm.skip_zero_advantage"
                        "=false); by default it leaves them out: same gradient, less work")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both trainers (fp32 master weights): r1pipe's model.dtype, TRL's bf16 flag")
    p.add_argument("--base", type=Path, default=None,
                   help="a pretrain stage directory (model/ and train.jsonl, e.g. runs/r1-zero/pretrain); default: a random tiny model")
    p.add_argument("--heldout-every", type=int, default=0,
                   help="with --base: greedy held-out accuracy every N steps for TRL, r1pipe at the same work and r1pipe "
                        "with dynamic sampling (its R1-Zero setting); prints the training seconds to 50%%, 80%% and 90%%")
    p.add_argument("--heldout", type=int, default=256, help="held-out problems evaluated (from the base's heldout.jsonl)")
    p.add_argument("--png", type=Path, default=Path("runs/bench/grpo_vs_trl_heldout.png"), help="the held-out curves' plot")
    p.add_argument("--max-staleness", type=int, choices=(0, 1), default=0,
                   help="1: also run r1pipe asynchronously (rl.rollout.max_staleness=1) at the same work, against its synchronous "
                        "run and TRL in the same run, with each side's idle share")
    p.add_argument("--pin-cores", action="store_true",
                   help="r1pipe's trainer on core 0 and engine on core 1, a thread each (CPU, --workers 1)")
    args = p.parse_args()
    if args.pin_cores and (args.workers != 1 or args.device != "cpu" or len(os.sched_getaffinity(0)) < 2):
        p.error("--pin-cores needs --device cpu, --workers 1 and at least 2 cores")
    if args.heldout_every and args.base is None:
        p.error("--heldout-every needs --base (a base whose held-out problems it can learn)")
    if args.workers < 1 or args.threads % args.workers:
        p.error(f"--threads {args.threads} does not split evenly over --workers {args.workers}")
    if args.base is not None and args.shape != "tiny":
        p.error("--shape is the random model's; --base brings its own model")
    torch.set_num_threads(args.threads)
    heldout = args.base / "heldout.jsonl" if args.heldout_every else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = problems(args, root)
        ours, our_curve = r1pipe_run(model, data, args, root / "r1pipe", heldout=heldout)
        if heldout:
            dyn, dyn_curve = r1pipe_run(model, data, args, root / "r1pipe-dynamic", dynamic_sampling=True, heldout=heldout)
        if args.max_staleness:
            late, late_curve = r1pipe_run(model, data, args, root / "r1pipe-async", heldout=heldout, max_staleness=1)
        theirs, their_curve = trl_run(model, data, args, root / "trl", heldout=heldout)
        effect = None if heldout else old_logprob_forward_effect(model, args)
    print(f"{'phase':8s} {'r1pipe s':>10s} {'TRL s':>10s}")
    for k in PHASES:
        print(f"{k:8s} {ours[k]:10.3f} {theirs[k]:10.3f}")
    ratio = theirs["step"] / ours["step"]
    layout = f", r1pipe: {args.workers} policy + {args.workers} rollout workers ({args.sharding})" if args.workers > 1 else ""
    if args.pin_cores:
        layout = ", r1pipe: trainer on core 0, engine on core 1"
    print(f"r1pipe step is {ratio:.2f}x TRL's speed ({args.prompts} prompts x {args.group}, {args.max_tokens} tokens{layout})")
    result = {"base": str(args.base) if args.base else f"random {args.shape}", "device": args.device, "dtype": args.dtype,
              "pin_cores": args.pin_cores,
              "threads": args.threads, "workers": args.workers, "sharding": args.sharding,
              "skip_zero_advantage": not args.keep_zero_advantage,
              "prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens, "steps": args.steps,
              "r1pipe_s": {k: round(v, 4) for k, v in ours.items()}, "trl_s": {k: round(v, 4) for k, v in theirs.items()},
              "speed_ratio_vs_trl": round(ratio, 2)}
    for name, run in (("synchronous", ours), *((("max_staleness 1", late),) if args.max_staleness else ())):
        print(f"r1pipe {name}: {run['step']:.3f} s/step, trainer idle {run['trainer_idle'] / run['step']:.0%}, "
              f"engines idle {run['engine_idle'] / run['step']:.0%} of a step")
    if args.max_staleness:
        print(f"r1pipe max_staleness 1: {ours['step'] / late['step']:.2f}x its synchronous step, "
              f"{theirs['step'] / late['step']:.2f}x TRL's")
        result.update(r1pipe_async_s={k: round(v, 4) for k, v in late.items()},
                      async_vs_sync=round(ours["step"] / late["step"], 2), async_vs_trl=round(theirs["step"] / late["step"], 2))
    if effect is not None:
        print(f"train phase, separate old-log-prob forward {effect['separate']:.3f}s vs the update's own {effect['fused']:.3f}s "
              f"({effect['separate'] / effect['fused']:.2f}x)")
        result.update(train_separate_old_forward_s=round(effect["separate"], 4), train_own_forward_s=round(effect["fused"], 4))
    if heldout:
        curves = {"r1pipe, dynamic sampling": dyn_curve, "r1pipe, same work as TRL": our_curve, "TRL GRPOTrainer": their_curve}
        if args.max_staleness:
            curves["r1pipe, same work, max_staleness 1"] = late_curve
        print(f"r1pipe with dynamic sampling: {dyn['step']:.3f} s/step")
        shares = (0.5, 0.8, 0.9)
        print(f"{'held-out':26s} {'final':>6s} {'best':>6s}" + "".join(f" {f's to {100 * x:.0f}%':>9s}" for x in shares))
        for name, curve in curves.items():
            reached = [time_to(curve, x) for x in shares]
            print(f"{name:26s} {100 * curve[-1][1]:5.1f}% {100 * max(a for _, a in curve):5.1f}%"
                  + "".join(f" {'-' if t is None else f'{t:.1f}':>9s}" for t in reached))
        plot_curves(curves, args.png, f"GRPO on the R1-Zero base: {args.prompts} prompts x {args.group}, "
                                      f"{args.max_tokens} tokens, {args.threads} threads{layout}")
        print(f"plot: {args.png}")
        result.update(r1pipe_dynamic_step_s=round(dyn["step"], 4),
                      heldout={name: {"curve": [[round(t, 2), round(a, 4)] for t, a in c],
                                      **{f"seconds_to_{100 * x:.0f}": time_to(c, x) for x in shares}}
                               for name, c in curves.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
