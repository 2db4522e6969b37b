"""Stage `pretrain`: the embedded tiny base model.

Builds a BPE tokenizer (or takes a given one as is: `tokenizer_path`, e.g. a teacher's, so that a
student shares its vocabulary) and pre-trains a DeepSeek-V3 preset (normally `tiny`) from scratch on a
synthetic corpus of arithmetic problems in the R1-Zero format (r1pipe.data.synthetic), where
completions that work the steps are rare and bare guesses are common. The result solves some but
far from all held-out problems, which is what R1-Zero-style RL starts from.

Outputs: model_path (Hugging Face layout + tokenizer), train_path, heldout_path and, with valid_size > 0,
valid_path (JSONL {"id", "prompt", "answer"}; pairwise disjoint, and none of them in the corpus), and the base's
held-out accuracy (greedy and sampled at T=1). Training checkpoints every `checkpoint_every`
steps and an interrupted run resumes from the last one; a finished base is cached under
`cache_dir`, keyed by everything that shapes it, so later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from r1pipe.algo.sft import SupervisedLoss
from r1pipe.causal_lm import DENSE_PRESETS, dense_config, load_model, save_model
from r1pipe.data.rows import SFTExample
from r1pipe.data.jsonl import write_jsonl
from r1pipe.data.synthetic import (
    CodeTask, Problem, code_row, cold_start_rows, corpus_texts, draw_splits, make_splits, math_row, problem_row,
    r1_corpus_texts,
)
from r1pipe.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_digest, train_tokenizer
from r1pipe.errors import ConfigError, ModelError
from r1pipe.model import ModelConfig, Precision, Transformer
from r1pipe.stages.base import StageContext
from r1pipe.stages.base_eval import measure_accuracy
from r1pipe.stages.configs import R1_WORLD_DEFAULTS, PretrainConfig
from r1pipe.stages.sections import SamplingResources
from r1pipe.stages.supervised import Schedule, SupervisedRun, export_model, train, trainer_policy
from r1pipe.tracking.checkpoints import atomic_write


# what a finished base leaves in its stage folder (and in the cache), by output key
OUTPUT_FILES = {"train_path": "train.jsonl", "heldout_path": "heldout.jsonl", "valid_path": "valid.jsonl",
                "code_train_path": "code_train.jsonl",
                "code_heldout_path": "code_heldout.jsonl", "mixed_train_path": "mixed_train.jsonl",
                "mixed_heldout_path": "mixed_heldout.jsonl", "sft_path": "cold_start.jsonl"}


def stage_model_section(cfg: PretrainConfig, recipe_model: dict) -> dict:
    """The model section this stage trains: the recipe's, with the stage's preset and overrides when it names one."""
    if cfg.preset is None:
        return dict(recipe_model)
    return {**recipe_model, "preset": cfg.preset, "overrides": dict(cfg.model_overrides)}


KEYED_OPTIM = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip")
UNKEYED_OPTIM = {"schedule": "cosine", "betas": [0.9, 0.95]}  # enter the key only when changed from these


def key_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The stage's settings flat, as the config held them before its sections (`optim.lr` as `lr`); the
    sections that do not shape the base (resources, parallelism, checkpoint) left out."""
    flat = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("optim", "resources", "parallelism", "checkpoint")}
    optim = asdict(cfg.optim)
    flat.update({k: optim[k] for k in KEYED_OPTIM})
    flat.update({k: optim[k] for k, before in UNKEYED_OPTIM.items() if optim[k] != before})
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}


def given_tokenizer(cfg: PretrainConfig, key: str = "tokenizer_path") -> Any:
    """The tokenizer at cfg.tokenizer_path (None when unset); a ConfigError naming `key` when that path holds
    no loadable tokenizer, or one without an end-of-sequence token (every corpus completion ends with it)."""
    if not cfg.tokenizer_path:
        return None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_path, key)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}={cfg.tokenizer_path}: the tokenizer has no end-of-sequence token")
    return tokenizer


def base_key(cfg: PretrainConfig, model_section: dict, seed: int) -> str:
    """Everything that shapes the base (not where it is written, how it is checked, or how many workers train
    it); `model_section` is stage_model_section's, so the stage's preset and model_overrides enter through it.
    A given tokenizer enters by its content (tokenizer_digest), not its path, and vocab_size then not at all."""
    unkeyed = {"cache_dir", "eval_size", "eval_max_tokens", "preset", "model_overrides", "tokenizer_path"}
    if cfg.tokenizer_path:
        unkeyed.add("vocab_size")
    shaping = {k: v for k, v in key_settings(cfg).items() if k not in unkeyed
               and not (k in R1_WORLD_DEFAULTS and v == R1_WORLD_DEFAULTS[k])  # R1-Zero bases keep their key
               and not (k == "valid_size" and v == 0)  # as do bases without validation problems
               and not (k == "split_seed" and v is None)}  # and bases whose splits follow run.seed
    if cfg.tokenizer_path:
        shaping["tokenizer"] = tokenizer_digest(given_tokenizer(cfg))
    # an empty fp8_exclude leaves the key as before the field existed, so cached bases stay valid
    model_section = {k: v for k, v in model_section.items() if not (k == "fp8_exclude" and not v)}
    # version 2 for dense bases: since then their corpus is tokenized by the trained tokenizer as is
    version = 2 if model_section.get("preset") in DENSE_PRESETS else 1
    key = {"pretrain": shaping, "model": model_section, "seed": seed, "version": version}
    key["trainer"] = "group"  # trained on the trainer group (fused AdamW, the step's sums), not the old in-process loop
    if cfg.world == "r1":  # 2: the cold-start set's code summaries name the function (its files are cached too)
        key["r1_world"] = 2
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _copy_outputs(src: Path, dst: Path) -> None:
    for name in ("model", "base_eval.json", *OUTPUT_FILES.values()):
        s, d = src / name, dst / name
        if not s.exists():
            continue
        if d.exists():
            shutil.rmtree(d) if d.is_dir() else d.unlink()
        shutil.copytree(s, d) if s.is_dir() else shutil.copy2(s, d)


def _outputs(stage_dir: Path, key: str) -> dict:
    report = json.loads((stage_dir / "base_eval.json").read_text()) if (stage_dir / "base_eval.json").exists() else {}
    files = {k: str(stage_dir / name) for k, name in OUTPUT_FILES.items() if (stage_dir / name).exists()}
    return {
        "model_path": str(stage_dir / "model"),
        **files,
        "base_key": key,
        **{k: v for k, v in report.items() if k != "samples"},
    }


def run_pretrain(cfg: PretrainConfig, ctx: StageContext) -> dict:
    model_section = stage_model_section(cfg, OmegaConf.to_container(ctx.recipe.model, resolve=True) if "model" in ctx.recipe else {})
    given_tokenizer(cfg, f"{ctx.stage_dir.name}.tokenizer_path")  # a path without a tokenizer fails here, naming the key
    key = base_key(cfg, model_section, ctx.seed)
    stage_dir = ctx.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    cached = Path(cfg.cache_dir).expanduser() / key if cfg.cache_dir else None
    if cached is not None and (cached / "COMPLETE").exists():
        _copy_outputs(cached, stage_dir)
        print(f"pretrain: reusing the cached base {cached}")
        return _outputs(stage_dir, key)

    train_base(cfg, model_section, ctx.seed, stage_dir, ctx.recipe)

    if cached is not None:  # publish atomically: copy to a temp dir, then rename
        try:
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _copy_outputs(stage_dir, tmp)
            (tmp / "COMPLETE").write_text(key)
            if not cached.exists():
                os.replace(tmp, cached)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:  # a read-only home or a full disk must not fail the run
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"pretrain: could not cache the base in {cached}: {e}")
    return _outputs(stage_dir, key)


def train_base(cfg: PretrainConfig, model_section: dict, seed: int, stage_dir: Path, recipe: Any = None) -> None:
    """Write stage_dir/{train,heldout}.jsonl (and valid.jsonl with valid_size > 0), stage_dir/model (weights +
    tokenizer), base_eval.json."""
    precision = Precision.from_section(model_section)  # model.dtype / fp8 / fp8_exclude; bad names fail here
    t0 = time.time()

    # 1. problems: held-out, RL-train and validation splits, then a corpus that avoids them all
    heldout, train_problems, valid = write_splits(cfg, seed, stage_dir)
    n_corpus = max(cfg.steps * cfg.batch_size, cfg.tokenizer_examples)
    n_corpus = min(n_corpus, 200_000)
    if cfg.world == "r1":
        corpus = write_r1_world(cfg, seed, stage_dir, heldout, train_problems, valid, n_corpus)
    else:
        corpus = corpus_texts(n_corpus, seed + 1, cfg.problem_kinds, cfg.max_digits, cfg.worked_fraction, cfg.guess_correct,
                              exclude=set(heldout) | set(train_problems) | set(valid), tutor_fraction=cfg.tutor_fraction)

    # 2. tokenizer (the given one as is, else a BPE trained on the corpus: deterministic given it) and the
    # initial model, saved together
    init_dir = stage_dir / "init"
    if not (init_dir / "config.json").exists():
        given = given_tokenizer(cfg)
        with atomic_write(init_dir) as tmp:
            if given is not None:
                given.save_pretrained(str(tmp))
            else:
                tok = train_tokenizer((p + c for p, c in corpus[: cfg.tokenizer_examples]), vocab_size=cfg.vocab_size)
                save_tokenizer(tok, tmp)
            model = build_model(model_section, load_tokenizer(tmp), precision, seed)
            save_model(model, tmp)
    tokenizer = load_tokenizer(init_dir)  # as SFT, GRPO and eval will load it
    num_params = sum(p.numel() for p in load_model(init_dir).parameters())

    # prompt and completion are encoded apart, exactly as generation sees them (a prompt is
    # tokenized alone, then the model continues it), and the loss covers the completion + eos.
    prompts = tokenizer([p for p, _ in corpus], add_special_tokens=False).input_ids
    completions = tokenizer([c for _, c in corpus], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    examples = [SFTExample(str(i), [*p, *c, eos], [False] * len(p) + [True] * (len(c) + 1))
                for i, (p, c) in enumerate(zip(prompts, completions))]

    # 3. the trainer group: CE on the completions (+ the MTP modules' for V3)
    run = SupervisedRun(
        name="pretrain", stage_dir=stage_dir, model_path=str(init_dir), examples=examples, heldout=[],
        batch_size=cfg.batch_size, schedule=Schedule(cfg.optim, cfg.steps),
        trainer=trainer_policy(cfg.optim, cfg.resources, cfg.parallelism, SupervisedLoss(mtp=cfg.mtp), cfg.batch_size,
                               seed, precision),
        resources=cfg.resources, recipe=recipe or {}, seed=seed,
        pad_id=tokenizer.pad_token_id, checkpoint_every=cfg.checkpoint.every, keep_checkpoints=cfg.checkpoint.keep,
        show=("loss", "grad_norm", "tokens_per_second"),
    )
    final, state = train(run)
    model_dir = stage_dir / "model"
    export_model(final, model_dir)
    report: dict[str, Any] = {"final_loss": state.get("train_loss"), "pretrain_seconds": round(state["wall_seconds"], 1),
                              "num_params": num_params, "vocab_size": len(tokenizer)}
    if cfg.eval_size > 0:
        rows = [problem_row(p, f"heldout-{i}") for i, p in enumerate(heldout[: cfg.eval_size])]
        # the base check generates where the trainer workers trained
        r = cfg.resources
        check_resources = SamplingResources(device=r.device, placement_strategy=r.placement_strategy,
                                            placement_timeout_s=r.placement_timeout_s, rollout=replace(r.trainer))
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            acc = measure_accuracy(model_dir, rows, temperature, cfg.eval_max_tokens, seed=seed, resources=check_resources,
                                   key="pretrain.resources", recipe=recipe)
            report[f"base_accuracy_{name}"] = acc.accuracy
            report[f"base_worked_fraction_{name}"] = acc.worked_fraction
            report[f"base_worked_accuracy_{name}"] = None if math.isnan(acc.worked_accuracy) else acc.worked_accuracy
        print("pretrain: base held-out accuracy greedy {:.1%} (worked {:.0%}), sampled T=1 {:.1%} (worked {:.0%}, "
              "accuracy when worked {})".format(report["base_accuracy_greedy"], report["base_worked_fraction_greedy"],
                                                 report["base_accuracy_sampled"], report["base_worked_fraction_sampled"],
                                                 report["base_worked_accuracy_sampled"]))
    report["seconds"] = round(time.time() - t0, 1)
    (stage_dir / "base_eval.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(run.ckpt_root, ignore_errors=True)  # the base is model/; its training state is no longer needed
    shutil.rmtree(init_dir, ignore_errors=True)


def split_seed(cfg: PretrainConfig, seed: int) -> int:
    """The seed of the problem splits: cfg.split_seed when set, else the run's."""
    return seed if cfg.split_seed is None else cfg.split_seed


def write_splits(cfg: PretrainConfig, seed: int, stage_dir: Path) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(held-out, RL-train, validation) problems, drawn in that order from one seeded stream (draw_splits), so
    validation problems leave the other two as without them; written as heldout.jsonl, train.jsonl and (when
    there are any) valid.jsonl. `seed` is the run's; cfg.split_seed, when set, replaces it here."""
    seed = split_seed(cfg, seed)
    heldout, train, valid = draw_splits(seed, cfg.problem_kinds, cfg.max_digits, (cfg.heldout_size, cfg.train_size, cfg.valid_size))
    write_jsonl(stage_dir / OUTPUT_FILES["heldout_path"], (problem_row(p, f"heldout-{i}") for i, p in enumerate(heldout)))
    write_jsonl(stage_dir / OUTPUT_FILES["train_path"], (problem_row(p, f"train-{i}") for i, p in enumerate(train)))
    if valid:
        write_jsonl(stage_dir / OUTPUT_FILES["valid_path"], (problem_row(p, f"valid-{i}") for i, p in enumerate(valid)))
    return heldout, train, valid


def build_model(model_section: dict, tokenizer: Any, precision: Any, seed: int) -> nn.Module:
    """A freshly initialised fp32 model of the section's preset, sized to the tokenizer: r1pipe's
    DeepSeek-V3 for a V3 preset, a transformers model for a dense preset (DENSE_PRESETS)."""
    preset = model_section.get("preset") or "tiny"
    overrides = dict(model_section.get("overrides") or {})
    torch.manual_seed(seed)  # the model initialises from torch's default generator
    if preset in DENSE_PRESETS:
        if precision.fp8:
            raise ConfigError(f"model.fp8: FP8 compute is for r1pipe's DeepSeek-V3, not the dense preset {preset!r}")
        config = dense_config(preset, tokenizer, **overrides)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config = ModelConfig.preset(preset)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ConfigError(f"model.overrides.{name}: not a ModelConfig field")
        setattr(config, name, value)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config.torch_dtype = "float32"
    config = ModelConfig.from_dict(config.to_dict())  # re-runs the config's own checks
    return Transformer(config)


def interleave(a: list, b: list) -> list:
    """a and b merged in their own orders, b spread evenly through a (any prefix holds both in proportion)."""
    keyed = sorted([(i / max(len(a), 1), 0, i) for i in range(len(a))] + [(i / max(len(b), 1), 1, i) for i in range(len(b))])
    return [(a, b)[which][i] for _, which, i in keyed]


def write_r1_world(cfg: PretrainConfig, seed: int, stage_dir: Path, heldout: list, train: list, valid: list,
                   n_corpus: int) -> list[tuple[str, str]]:
    """The R1 world's extra files (code tasks, mixed-domain splits, the cold-start set) and its
    corpus, which avoids every held-out, RL, validation and cold-start problem."""
    exclude = set(heldout) | set(train) | set(valid)
    code_heldout, code_train = make_splits(split_seed(cfg, seed) + 2, cfg.problem_kinds, cfg.max_digits, cfg.code_heldout_size,
                                           cfg.code_train_size) if cfg.code_fraction > 0 else ([], [])
    exclude |= set(code_heldout) | set(code_train)
    math_heldout_rows = [math_row(p, f"heldout-{i}") for i, p in enumerate(heldout)]
    code_heldout_rows = [code_row(CodeTask(p), f"code-heldout-{i}") for i, p in enumerate(code_heldout)]
    code_train_rows = [code_row(CodeTask(p), f"code-train-{i}") for i, p in enumerate(code_train)]
    math_train_rows = [math_row(p, f"train-{i}") for i, p in enumerate(train)]
    if code_train_rows:
        write_jsonl(stage_dir / OUTPUT_FILES["code_train_path"], code_train_rows)
        write_jsonl(stage_dir / OUTPUT_FILES["code_heldout_path"], code_heldout_rows)
    # mixed sets: code rows spread evenly through the math rows, so any prefix mixes both
    write_jsonl(stage_dir / OUTPUT_FILES["mixed_train_path"], interleave(math_train_rows, code_train_rows))
    write_jsonl(stage_dir / OUTPUT_FILES["mixed_heldout_path"], interleave(math_heldout_rows, code_heldout_rows))
    if cfg.cold_start_size:
        cold = cold_start_rows(cfg.cold_start_size, seed + 3, cfg.problem_kinds, cfg.max_digits, exclude, cfg.code_fraction)
        write_jsonl(stage_dir / OUTPUT_FILES["sft_path"], (row for _, row in cold))
        exclude |= {p for p, _ in cold}
    return r1_corpus_texts(n_corpus, seed + 1, cfg.problem_kinds, cfg.max_digits, worked_fraction=cfg.worked_fraction,
                           guess_correct=cfg.guess_correct, exclude=exclude, tutor_fraction=cfg.tutor_fraction,
                           mix_fraction=cfg.mix_fraction, mix_prob=cfg.mix_prob, code_fraction=cfg.code_fraction)
