"""`r1pipe eval`: evaluate a model, or re-score saved generations, on math and code suites.

    r1pipe eval --model runs/r1-zero/rl/checkpoints/step_000100 --suite gsm8k,math500 -k 4 --out eval_out
    r1pipe eval --model Qwen2.5-Math-1.5B/ --suite aime24 -k 64 --max-tokens 32768 --workers 8 --backend vllm
    r1pipe eval --suite-file heldout.jsonl --model ckpt/ --greedy
    r1pipe eval --suite gsm8k --responses eval_out/generations.jsonl --out rescored
    r1pipe eval ... --dry-run      # check the arguments and print the plan; no model or file is read
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from r1pipe.errors import UserError, unwrap
from r1pipe.vocab import ENGINE_BACKENDS as BACKENDS
from r1pipe.eval.runner import check_request, evaluate
from r1pipe.eval.suites import KINDS, REGISTRY, Suite, load_suite_file, resolve_suites
from r1pipe.eval.templates import TEMPLATES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to evaluate")
    source.add_argument("--model", help="checkpoint directory (r1pipe deepseek_v3 or a Hugging Face causal LM)")
    source.add_argument("--responses", help="JSONL of saved generations {'id', 'response'[, 'suite']} to score instead of generating")
    source.add_argument("--suite", default=None,
                        help=f"comma-separated shipped suites: {', '.join(REGISTRY)}, or the groups math, code, all")
    source.add_argument("--suite-file", action="append", default=[],
                        help="a user suite (repeatable): a JSONL/Parquet/CSV file, a save_to_disk directory or a hub name[:split]")
    source.add_argument("--split", default="train", help="--suite-file split for save_to_disk dataset dicts and hub names")
    source.add_argument("--suite-name", help="name of the --suite-file suite in reports (default: the file's stem)")
    source.add_argument("--suite-kind", choices=KINDS, default="math", help="how --suite-file rows are graded")
    source.add_argument("--prompt-field", default=None,
                        help="--suite-file field with the question (default: auto-detected: prompt, problem, question, instruction, ...)")
    source.add_argument("--answer-field", default=None,
                        help="--suite-file field with the gold answer, math (default: auto-detected: answer, final_answer, solution, ...)")
    source.add_argument("--id-field", default=None, help="--suite-file field with the problem id (default: auto-detected, else the line number)")
    source.add_argument("--limit", type=int, help="only the first N problems of each suite")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("-k", "--samples", type=int, default=1, help="samples per problem (R1 paper: 4..64)")
    protocol.add_argument("--greedy", action="store_true", help="greedy decoding (one sample)")
    protocol.add_argument("--temperature", type=float, default=0.6)
    protocol.add_argument("--top-p", type=float, default=0.95)
    protocol.add_argument("--max-tokens", type=int, default=4096)
    protocol.add_argument("--pass-at", type=int_list, default=[], help="extra pass@j values to report, e.g. 1,5,10")
    protocol.add_argument("--template", choices=TEMPLATES, default="auto",
                          help="auto: the chat template with the R1 instruction when the tokenizer has one, else R1-Zero's")
    protocol.add_argument("--extract", default="auto", help="answer extraction mode passed to r1pipe.rewards.extract_answer")
    protocol.add_argument("--seed", type=int, default=0)

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--backend", choices=BACKENDS, default="engine",
                         help="engine: r1pipe's own; vllm: vLLM (GPU, `pip install 'r1pipe[vllm]'`)")
    runtime.add_argument("--workers", type=int, default=1,
                         help="generation workers (Ray actors), the problems split between them (on GPUs: one GPU each)")
    runtime.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    runtime.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    runtime.add_argument("--max-num-seqs", type=int, help="engine backend: sequences decoded together")
    runtime.add_argument("--max-model-len", type=int, help="engine backend: longest prompt + completion (sizes the KV cache)")
    runtime.add_argument("--grade-threads", type=int, default=None,
                         help="grading threads of the reward actor (default: CPU count, at most 8)")
    runtime.add_argument("--ray-address", default=None,
                         help="join this Ray cluster (or 'auto') instead of starting a local one for the run")
    runtime.add_argument("--timeout", type=float, default=10.0, help="seconds per answer check or program run")
    runtime.add_argument("--out", default="eval_out", help="output directory for report.json, report.md, generations.jsonl")
    runtime.add_argument("--quiet", action="store_true", help="no progress bars or table")
    runtime.add_argument("--dry-run", action="store_true",
                         help="check the arguments and print what would run; no model, suite file or responses file is read")


def engine_options(args: argparse.Namespace) -> dict[str, int]:
    """Cache sizing for the engine (vLLM takes the same two)."""
    options = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len}
    return {key: value for key, value in options.items() if value is not None}


def describe_plan(args: argparse.Namespace, shipped: list[Suite]) -> str:
    """What `r1pipe eval` would do with these arguments, in a few lines (`--dry-run`)."""
    def where(path: str) -> str:
        return path if Path(path).expanduser().exists() else f"{path} (not found here)"

    if args.model is not None:
        workers = f"{args.workers} worker{'s' * (args.workers > 1)}"
        source = (f"generate with {where(args.model)}, backend {args.backend}, {workers}, {args.dtype}, "
                  f"device {args.device or 'auto'}")
        sampling = ("greedy, 1 sample" if args.greedy else
                    f"{args.samples} sample{'s' * (args.samples > 1)} at temperature {args.temperature}, top-p {args.top_p}")
        protocol = f"{sampling} per problem, at most {args.max_tokens} new tokens, template {args.template}, seed {args.seed}"
    else:
        source = f"no model: score the saved generations in {where(args.responses)}"
        protocol = "the saved generations"
    suites = [f"{s.name} ({s.kind}, {len(s) if args.limit is None else min(args.limit, len(s))} problems)" for s in shipped]
    fields = ", ".join(f"{role} field {name}" for role, name in (("question", args.prompt_field), ("answer", args.answer_field),
                                                                  ("id", args.id_field)) if name) or "fields auto-detected"
    suites += [f"{where(path)} ({args.suite_kind}, {fields})" for path in args.suite_file]
    math = any(s.kind == "math" for s in shipped) or (args.suite_file and args.suite_kind == "math")
    extra = "".join(f", pass@{j}" for j in sorted(set(args.pass_at)) if 1 < j < args.samples)
    return "\n".join([
        "r1pipe eval --dry-run: nothing is generated, graded or written",
        f"  source    {source}",
        f"  suites    {'; '.join(suites)}",
        f"  protocol  {protocol}",
        f"  metrics   pass@1{', cons@k (math)' if math else ''}, pass@k{extra}; each answer check or program run "
        f"limited to {args.timeout:g} s",
        f"  output    {args.out}/report.json, {args.out}/report.md, {args.out}/generations.jsonl",
    ])


def main(args: argparse.Namespace) -> int:
    if not args.suite and not args.suite_file:
        print("r1pipe eval: name at least one --suite or --suite-file", file=sys.stderr)
        return 2
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:
        print(f"r1pipe eval: --temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}",
              file=sys.stderr)
        return 2
    try:
        check_request(args.model, args.responses, args.out, k=args.samples, greedy=args.greedy,
                      max_tokens=args.max_tokens, limit=args.limit, workers=args.workers, backend=args.backend)
        suites = resolve_suites(args.suite) if args.suite else []
        if args.dry_run:
            print(describe_plan(args, suites))
            return 0
        for path in args.suite_file:
            name = args.suite_name if args.suite_name and len(args.suite_file) == 1 else None
            suite = load_suite_file(path, name=name, kind=args.suite_kind, prompt_field=args.prompt_field,
                                    answer_field=args.answer_field, id_field=args.id_field, split=args.split,
                                    log=lambda line: print(f"r1pipe eval: {line}", file=sys.stderr))
            if suite.skipped:
                print(f"r1pipe eval: {path}: skipped {suite.skipped} malformed rows, e.g. {suite.skipped_reasons[0]}", file=sys.stderr)
            if not suite.problems:
                print(f"r1pipe eval: {path}: no usable problems", file=sys.stderr)
                return 2
            suites.append(suite)
        evaluate(
            args.model, suites, args.out, responses=args.responses, k=args.samples, greedy=args.greedy,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, template=args.template,
            backend=args.backend, workers=args.workers, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed,
            limit=args.limit, pass_at=args.pass_at, grade_threads=args.grade_threads, timeout_s=args.timeout,
            extract_mode=args.extract, show=not args.quiet, backend_options=engine_options(args),
            cluster={"address": args.ray_address} if args.ray_address else None,
        )
    except (FileNotFoundError, KeyError, ValueError) as e:  # the eval library's complaints about its input
        cause = unwrap(e)  # raised in a generation worker (e.g. a prompt too long for --max-model-len)
        if isinstance(cause, UserError):
            raise
        raise UserError(cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)) from e
    print(f"reports: {args.out}/report.json, {args.out}/report.md; samples: {args.out}/generations.jsonl")
    return 0
