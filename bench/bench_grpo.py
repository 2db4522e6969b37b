"""One GRPO step end to end (rollout, reward, train, sync), split by phase, against TRL's GRPOTrainer.

Both train the same tiny DeepSeek-V3 on the same R1-Zero arithmetic prompts, in the same order, with
the same reward (r1pipe's accuracy reward, called as a plain function by both), group size, completion
length, sampling temperature 1, no KL, one update per batch, the same compute dtype (`--dtype`: fp32, or
bf16 autocast over fp32 master weights for both) and the same torch thread count (TRL's own defaults are
bf16 autocast and gradient checkpointing; checkpointing is off here, as r1pipe does not use it). The model is a randomly initialised one (tests/tiny_models.make_tiny_v3, built locally:
every completion runs to the length limit), or with `--base` the R1-Zero recipe's pretrained base and
its training prompts (completions stop at EOS as in the real run). r1pipe runs its
`grpo` stage (Ray workers, dynamic sampling off: the same work as TRL); phases are its own
time/* metrics. TRL's step is timed by a callback; its rollout is `_generate`, its reward the
reward function's own time, its train the rest. Medians over the steps after the first.

Also measured, in-process on one PolicyWorker and the same batch shape: the train phase with a
separate forward for the old log-probs (what r1pipe did before) against the update's own detached
forward (what it does now with updates_per_step == 1). Last line: a JSON object with the figures.

    python bench/bench_grpo.py                       # CPU: 8 prompts x 4, 32 tokens, 4 steps
    python bench/bench_grpo.py --prompts 32 --group 8 --max-tokens 64 --steps 10
    python bench/bench_grpo.py --base runs/r1-zero/pretrain --prompts 32 --group 8 --max-tokens 64 --steps 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_tiny_v3, write_worked_solutions  # noqa: E402

from r1pipe.data.jsonl import read_jsonl, write_jsonl  # noqa: E402
from r1pipe.data.templates import r1_zero_prompt  # noqa: E402
from r1pipe.model import Precision  # noqa: E402
from r1pipe.rewards import build_reward_fn  # noqa: E402

_REWARD = build_reward_fn({"accuracy": 1.0})
REWARD_SECONDS = [0.0]


def accuracy(text: str, reference: dict) -> float:
    """The reward both trainers use: r1pipe's accuracy reward of one completion (timed)."""
    t = time.perf_counter()
    value = float(_REWARD(text, reference).total)
    REWARD_SECONDS[0] += time.perf_counter() - t
    return value


def r1pipe_phases(model: Path, data: Path, args, root: Path) -> dict[str, float]:
    from r1pipe.stages.base import StageContext
    from r1pipe.stages.configs import GRPOConfig
    from r1pipe.stages.grpo import run_grpo

    cfg = GRPOConfig(train_path=str(data), heldout_path=str(data), heldout_size=2, template="raw", steps=args.steps,
                     prompts_per_step=args.prompts, group_size=args.group, max_tokens=args.max_tokens, stop=[],
                     reward_weights={}, extra_rewards={f"{__name__}:accuracy": 1.0}, dynamic_sampling=False,
                     micro_batch_size=args.prompts * args.group, threads_per_worker=args.threads,
                     checkpoint_every=10**6, lr=1e-4)
    recipe = OmegaConf.create({"cluster": {"address": None, "num_cpus": 2},
                               "model": {"path": str(model), "dtype": args.dtype}})
    run_grpo(cfg, StageContext(run_dir=root, stage_dir=root / "rl", recipe=recipe, seed=0))
    rows = [json.loads(line) for line in (root / "rl" / "metrics.jsonl").read_text().splitlines()][2:]  # after step 1
    return {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("rollout", "reward", "train", "sync", "step")}


def trl_phases(model: Path, data: Path, args, root: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    rows = read_jsonl(data)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    steps: list[dict[str, float]] = []
    clock = {"generate": 0.0}

    def reward(prompts, completions, answer, **_):
        return [accuracy(c, {"answer": a}) for c, a in zip(completions, answer)]

    class Phases(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, clock["generate"], REWARD_SECONDS[0] = time.perf_counter(), 0.0, 0.0

        def on_step_end(self, a, state, control, **kw):
            step = time.perf_counter() - self.t0
            steps.append({"rollout": clock["generate"], "reward": REWARD_SECONDS[0], "step": step,
                          "train": step - clock["generate"] - REWARD_SECONDS[0], "sync": 0.0})

    config = TRLConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=args.max_tokens, max_steps=args.steps,
                       temperature=1.0, beta=0.0, num_iterations=1, learning_rate=1e-4, use_cpu=True, report_to=[],
                       bf16=args.dtype == "bfloat16", gradient_checkpointing=False,
                       save_strategy="no", logging_steps=10**6, shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=str(model), reward_funcs=[reward], args=config, train_dataset=dataset, callbacks=[Phases()])
    generate = trainer._generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            clock["generate"] += time.perf_counter() - t

    trainer._generate = timed_generate
    trainer.train()
    return {k: statistics.median(s[k] for s in steps[1:]) for k in ("rollout", "reward", "train", "sync", "step")}


def old_logprob_forward_effect(model: Path, args) -> dict[str, float]:
    """Train-phase seconds with a separate old-log-prob forward vs the update's own (median of 3)."""
    from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch

    g = torch.Generator().manual_seed(0)
    rows = args.prompts * args.group
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    batch = build_batch([torch.randint(3, vocab, (24,), generator=g).tolist() for _ in range(rows)],
                        [torch.randint(3, vocab, (args.max_tokens,), generator=g).tolist() for _ in range(rows)], pad_id=0)
    adv = torch.randn(rows, generator=g)
    worker = PolicyWorker(0, 1, str(model), PolicyConfig(lr=1e-6, micro_batch_size=rows, num_threads=args.threads,
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


def problems(args, root: Path) -> tuple[Path, Path]:
    """(model directory, JSONL of R1-Zero prompts with answers) for the run: the base's own, or a random
    tiny model and freshly generated problems."""
    data = root / "problems.jsonl"
    wanted = args.prompts * (args.steps + 1)
    if args.base is not None:
        rows = read_jsonl(args.base / "train.jsonl")[:wanted]
        write_jsonl(data, [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        return args.base / "model", data
    model = make_tiny_v3(root / "model")
    source = read_jsonl(write_worked_solutions(root / "src.jsonl", wanted))
    write_jsonl(data, [{"id": r["id"], "prompt": r1_zero_prompt(r["problem"]), "answer": r["answer"]} for r in source])
    return model, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both trainers (fp32 master weights): r1pipe's model.dtype, TRL's bf16 flag")
    p.add_argument("--base", type=Path, default=None,
                   help="a pretrain stage directory (model/ and train.jsonl, e.g. runs/r1-zero/pretrain); default: a random tiny model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = problems(args, root)
        ours = r1pipe_phases(model, data, args, root / "r1pipe")
        theirs = trl_phases(model, data, args, root / "trl")
        effect = old_logprob_forward_effect(model, args)
    print(f"{'phase':8s} {'r1pipe s':>10s} {'TRL s':>10s}")
    for k in ("rollout", "reward", "train", "sync", "step"):
        print(f"{k:8s} {ours[k]:10.3f} {theirs[k]:10.3f}")
    ratio = theirs["step"] / ours["step"]
    print(f"r1pipe step is {ratio:.2f}x TRL's speed ({args.prompts} prompts x {args.group}, {args.max_tokens} tokens)")
    print(f"train phase, separate old-log-prob forward {effect['separate']:.3f}s vs the update's own {effect['fused']:.3f}s "
          f"({effect['separate'] / effect['fused']:.2f}x)")
    print(json.dumps({"base": str(args.base) if args.base else "random tiny", "dtype": args.dtype, "threads": args.threads, "prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens,
                      "steps": args.steps, "r1pipe_s": {k: round(v, 4) for k, v in ours.items()},
                      "trl_s": {k: round(v, 4) for k, v in theirs.items()}, "speed_ratio_vs_trl": round(ratio, 2),
                      "train_separate_old_forward_s": round(effect["separate"], 4),
                      "train_own_forward_s": round(effect["fused"], 4)}))


if __name__ == "__main__":
    main()
