"""SFT throughput: r1pipe's trainer group (the `sft` stage's step) against TRL's SFTTrainer, same model, data
and batch shape.

Both train the same randomly initialised tiny Qwen2 (r1pipe.causal_lm DENSE_PRESETS, built locally)
on the same worked-arithmetic prompt/completion pairs, with loss on completion tokens only,
AdamW, the same batch size and number of steps, fp32, the same number of CPU threads in all. Throughput
is real (non-padding) tokens trained per second of the training loop; tokenization is outside both
timings. r1pipe runs its trainer group (Ray actors, FSDP2 over gloo with 2 workers) with one worker
holding every thread, then with 2 workers splitting them, then on the tiny V3 student (MTP on) with one
worker; the 2-worker run is repeated with replicas (`parallelism.fsdp: false`, gradients summed in shared
memory) instead of FSDP2. TRL runs twice: default batches, and with `train_sampling_strategy="group_by_length"` (the
closest to r1pipe's length-sorted micro-batches). Last line: a JSON object with the figures and ratios.

    python bench/bench_sft.py                 # CPU, 40 steps of 16
    python bench/bench_sft.py --device cuda --steps 100
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_tiny_v3, write_worked_solutions  # noqa: E402

from r1pipe.causal_lm import init_dense_student  # noqa: E402
from r1pipe.data.batch import EpochOrder  # noqa: E402
from r1pipe.data.jsonl import read_jsonl  # noqa: E402
from r1pipe.data.templates import r1_zero_prompt  # noqa: E402
from r1pipe.data.tokenizer import load_tokenizer  # noqa: E402
from r1pipe.stages.base import StageContext  # noqa: E402
from r1pipe.config import make_config  # noqa: E402
from r1pipe.stages.configs import SFTConfig  # noqa: E402
from r1pipe.stages.sft import load_data, trainer_config  # noqa: E402
from r1pipe.stages.supervised import batch_of  # noqa: E402
from r1pipe.workers.group import PolicyGroup  # noqa: E402
from r1pipe.workers.placement import ResourcePlan, RoleResources, reserve  # noqa: E402


def r1pipe_tokens_per_second(model_dir: Path, data: Path, args, root: Path, workers: int, fsdp: bool = True) -> float:
    """The trainer group's steps, timed after `warmup` steps: `workers` actors sharing args.threads CPUs."""
    cfg = make_config(SFTConfig, {"data": {"train_path": str(data), "heldout_fraction": 0.0, "template": "r1-zero"},
                                  "batch_size": args.batch, "micro_batch_size": args.batch, "optim.lr": 1e-4,
                                  "resources.device": args.device, "resources.trainer.threads": args.threads // workers,
                                  "parallelism.fsdp": fsdp})
    ctx = StageContext(run_dir=root, stage_dir=root / "sft", recipe=OmegaConf.create({"model": {"path": str(model_dir)}}), seed=0)
    tok = load_tokenizer(model_dir)
    examples, _, _ = load_data(cfg, ctx, tok, 1024)
    order = EpochOrder(len(examples), args.batch, seed=0)
    gpus = 1.0 / workers if args.device == "cuda" else 0.0
    placement = reserve(ResourcePlan([RoleResources("policy", workers, args.threads / workers, gpus)]))
    group = PolicyGroup(workers, str(model_dir), trainer_config(cfg, ctx), placement=placement)
    batches = [batch_of([examples[i] for i in order.step(step)], tok.pad_token_id) for step in range(args.warmup + args.steps)]
    for batch in batches[: args.warmup]:
        group.supervised_step(batch)
    t0, tokens = time.perf_counter(), 0.0
    for batch in batches[args.warmup:]:
        tokens += group.supervised_step(batch)["tokens"]
    seconds = time.perf_counter() - t0
    group.shutdown()
    placement.remove()
    return tokens / seconds


class TokenCounter:
    """A TrainerCallback counting the real tokens of each batch and timing steps after warmup."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        outer = self
        self.warmup, self.tokens, self.t0, self.t1 = warmup, 0, None, None

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == outer.warmup:
                    _sync(args.device.type)
                    outer.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                _sync(args.device.type)
                outer.t1 = time.perf_counter()

        self.callback = Callback()


def trl_tokens_per_second(model_dir: Path, data: Path, args, root: Path, group_by_length: bool) -> float:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    tok = load_tokenizer(model_dir)
    rows = read_jsonl(data)
    ds = datasets.Dataset.from_list([{"prompt": r1_zero_prompt(r["problem"]), "completion": " " + r["solution"] + tok.eos_token}
                                     for r in rows])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = TRLConfig(
        output_dir=str(root / f"trl{int(group_by_length)}"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10_000,
        save_strategy="no", report_to=[], completion_only_loss=True, packing=False, max_length=1024,
        train_sampling_strategy="group_by_length" if group_by_length else "random", dataloader_num_workers=0, use_cpu=args.device == "cpu", seed=0,
        disable_tqdm=True, eos_token=tok.eos_token, pad_token=tok.pad_token,
    )
    counter = TokenCounter(args.warmup)
    trainer = TRLTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[counter.callback])
    collate, batch_tokens = trainer.data_collator, []

    def counting_collator(features):  # the real tokens of every batch the trainer draws
        batch = collate(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return sum(batch_tokens[args.warmup:args.warmup + args.steps]) / (counter.t1 - counter.t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for each side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # TRL trains in this process
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        v3 = make_tiny_v3(root / "v3", num_nextn_predict_layers=1)
        model_dir = init_dense_student("tiny-qwen2", v3, root / "qwen2", seed=0)
        data = write_worked_solutions(root / "sft.jsonl", args.examples)
        # TRL first, before Ray runs anything beside it
        figures["trl_qwen2"] = trl_tokens_per_second(model_dir, data, args, root, group_by_length=False)
        figures["trl_qwen2_grouped"] = trl_tokens_per_second(model_dir, data, args, root, group_by_length=True)
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        figures["r1pipe_qwen2_1_worker"] = r1pipe_tokens_per_second(model_dir, data, args, root, workers=1)
        figures["r1pipe_qwen2_2_workers"] = r1pipe_tokens_per_second(model_dir, data, args, root, workers=2)
        figures["r1pipe_qwen2_2_replicas"] = r1pipe_tokens_per_second(model_dir, data, args, root, workers=2, fsdp=False)
        figures["r1pipe_v3_1_worker"] = r1pipe_tokens_per_second(v3, data, args, root, workers=1)
        ray.shutdown()
    for name, value in figures.items():
        print(f"{name:26s} {value:10.0f} tokens/s")
    ours = figures["r1pipe_qwen2_1_worker"]
    print(f"r1pipe (1 worker) / TRL: {ours / figures['trl_qwen2']:.2f}x; / TRL grouped: {ours / figures['trl_qwen2_grouped']:.2f}x; "
          f"2 workers / TRL: {figures['r1pipe_qwen2_2_workers'] / figures['trl_qwen2']:.2f}x")
    print(json.dumps({"device": args.device, "threads": args.threads, "steps": args.steps, "batch": args.batch,
                      **{k: round(v) for k, v in figures.items()},
                      "ratio_vs_trl": round(ours / figures["trl_qwen2"], 2),
                      "ratio_vs_trl_grouped": round(ours / figures["trl_qwen2_grouped"], 2),
                      "ratio_2_workers_vs_trl": round(figures["r1pipe_qwen2_2_workers"] / figures["trl_qwen2"], 2)}))


if __name__ == "__main__":
    main()
