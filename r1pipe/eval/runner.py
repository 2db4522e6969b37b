"""`evaluate`: generate (or read saved) responses for each suite, grade them, compute the R1
protocol's metrics and write report.json, report.md and generations.jsonl into `out_dir`.

Generation goes through a GenerationGroup (r1pipe.workers.generation: N rollout workers, r1pipe's engine or
vLLM) and grading through a RewardPool (r1pipe.eval.scoring), as in the stages; Ray is started for the run
when it is not running (and shut down after it), quietly.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch

from r1pipe.data.jsonl import SkipReport, read_jsonl_rows
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.engine import check_supported
from r1pipe.vocab import ENGINE_BACKENDS as BACKENDS
from r1pipe.errors import DataError
from r1pipe.eval.metrics import cons_at_k, mean_pass_at_1, mean_pass_at_k
from r1pipe.eval.report import SuiteResult, append_generations, print_table, write_report
from r1pipe.eval.scoring import Graded, grade_all, grading_pool
from r1pipe.eval.suites import Problem, Suite, resolve_suites
from r1pipe.eval.templates import render, resolve_template
from r1pipe.stages.sections import SamplingResources, Workers
from r1pipe.workers.cluster import ray_init
from r1pipe.workers.generation import GenerationGroup, Sampling

REWARD_CPUS = 0.5  # Ray CPUs of the grading actor; the generation workers share the rest


def read_responses(path: str | Path, suites: Sequence[Suite]) -> tuple[dict[str, dict[str, list[str]]], SkipReport]:
    """Saved responses grouped as {suite name: {problem id: [response, ...]}}, in file order.
    Rows may name their `suite`; rows without one belong to the only suite given. Returns the
    groups and the report of rows kept and skipped (blank, not JSON, no `id` or no string `response`).
    A file without a single usable row is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"responses file not found: {path}")
    names = {s.name for s in suites}
    grouped: dict[str, dict[str, list[str]]] = {s.name: {} for s in suites}
    report = SkipReport()
    rows, lines = read_jsonl_rows(path, report)
    for row, line in zip(rows, lines):
        if "id" not in row or not isinstance(row.get("response"), str):
            report.skip(f"line {line + 1}", "no 'id' and string 'response'")
            continue
        report.kept += 1
        suite_name = row.get("suite")
        if suite_name is None:
            if len(suites) != 1:
                raise DataError(f"{path}: rows need a 'suite' field when scoring several suites")
            suite_name = suites[0].name
        if suite_name not in names:
            continue  # another suite's samples in a shared file
        grouped[suite_name].setdefault(str(row["id"]), []).append(row["response"])
    if not report.kept:
        raise DataError(f"{path}: no responses: " + (report.summary() if report.skipped else "the file is empty"))
    return grouped, report


def suite_metrics(suite: Suite, graded: list[list[Graded]], pass_at: Sequence[int]) -> tuple[int, dict[str, float]]:
    """(k, metrics) over the problems' graded samples; k is the fewest samples any problem has."""
    scores = [[g.score for g in samples] for samples in graded]
    k = min((len(s) for s in scores), default=0)
    metrics: dict[str, float] = {"pass@1": mean_pass_at_1(scores)}
    if suite.kind == "math":
        metrics["cons@k"] = cons_at_k([[g.answer for g in samples] for samples in graded], scores)
    if k >= 1:
        metrics["pass@k"] = mean_pass_at_k(scores, k)
        for j in sorted(set(pass_at)):
            if 1 < j < k:
                metrics[f"pass@{j}"] = mean_pass_at_k(scores, j)
    return k, metrics


def check_request(model: Any, responses: str | Path | None, out_dir: str | Path, *, k: int, greedy: bool,
                  max_tokens: int, limit: int | None, workers: int = 1, backend: str = "engine") -> None:
    """The settings `evaluate` checks before it loads a model or reads a file (`r1pipe eval --dry-run`
    runs exactly these): a ValueError naming the first one it cannot run with."""
    if (model is None) == (responses is None):
        raise ValueError("give exactly one of a model to generate with (--model) or saved responses to score (--responses)")
    if model is not None and not isinstance(model, (str, Path)):
        raise ValueError(f"model: a checkpoint directory is expected, got {type(model).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if greedy and k != 1:
        raise ValueError("greedy decoding gives one sample per problem: use k=1 with greedy")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"output directory {out_dir}: exists and is not a directory")


def engine_options(backend: str, device: str, dtype: torch.dtype, options: dict[str, Any]) -> dict[str, Any]:
    """The engine's keyword arguments: r1pipe's engine takes device, dtype and every sizing option; vLLM
    (which places and types itself) the sizing options, which VLLMEngine translates to vLLM's names."""
    if backend == "engine":
        return {"device": device, "dtype": dtype, **options}
    return dict(options)


def generation_resources(workers: int, device: str) -> SamplingResources:
    """`workers` generation workers on `device`, next to one grading actor: on GPUs one GPU each; on CPUs the
    CPUs of the cluster's largest node shared out (and as many torch threads each)."""
    reward = Workers(workers=1, cpus=REWARD_CPUS, threads=0)
    if device.startswith("cuda"):
        return SamplingResources(device=device, rollout=Workers(workers=workers, cpus=1.0, gpus=1.0, threads=0), reward=reward)
    cpus = max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=1.0)
    share = max((cpus - REWARD_CPUS) / workers, 0.25)
    return SamplingResources(device=device, reward=reward,
                             rollout=Workers(workers=workers, cpus=share, threads=max(1, int(cpus) // workers)))


def evaluate(
    model: str | Path | None = None,
    suites: str | Sequence[str | Suite] = "gsm8k",
    out_dir: str | Path = "eval_out",
    *,
    responses: str | Path | None = None,
    k: int = 1,
    greedy: bool = False,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int = 4096,
    template: str = "auto",
    backend: str = "engine",
    workers: int = 1,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    limit: int | None = None,
    pass_at: Sequence[int] = (),
    grade_threads: int | None = None,
    timeout_s: float = 10.0,
    extract_mode: str = "auto",
    backend_options: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Evaluate the checkpoint `model` on `suites` with `workers` generation workers of `backend`, or
    re-score saved `responses` (JSONL of {"id", "response"[, "suite"]}) with no model at all. Ray is
    started as `cluster` (a recipe's cluster section) says when it is not running, and then shut down at
    the end. Returns the report dict also written to out_dir/report.json."""
    check_request(model, responses, out_dir, k=k, greedy=greedy, max_tokens=max_tokens, limit=limit, workers=workers,
                  backend=backend)
    if isinstance(suites, str):
        suites = resolve_suites(suites)
    suite_list = [s if isinstance(s, Suite) else resolve_suites(s)[0] for s in suites]
    if len({s.name for s in suite_list}) != len(suite_list):
        raise ValueError("suite names must be distinct")
    if responses is not None and not Path(responses).is_file():
        raise FileNotFoundError(f"responses file not found: {responses}")
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model} (a checkpoint directory is expected; nothing is downloaded)")
    if model is not None and backend == "engine":
        check_supported(model)  # an architecture the engine does not run: one error before Ray or a worker starts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generations_path = out / "generations.jsonl"
    generations_path.write_text("")  # this run's samples only

    sampling = Sampling(k=k, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                        max_tokens=max_tokens, stop=(), seed=seed)
    meta: dict[str, Any] = {"mode": "responses" if responses is not None else "generate"}
    saved: dict[str, dict[str, list[str]]] = {}
    tokenizer = None
    if responses is not None:
        saved, read = read_responses(responses, suite_list)
        meta.update(responses=str(responses), malformed_response_rows=read.skipped,
                    malformed_response_reasons=dict(read.reasons))
        if read.skipped:
            print(f"r1pipe eval: {responses}: skipped {read.skipped} malformed rows ({read.summary()})", file=sys.stderr)
    else:
        tokenizer = load_tokenizer(model)
        template = resolve_template(template, tokenizer)
        meta.update(model=str(model), backend=backend, workers=workers, template=template, k=k, greedy=greedy,
                    temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max_tokens, seed=seed)

    started_ray = not ray.is_initialized()
    ray_init({"cluster": dict(cluster or {})}, quiet=True)
    group: GenerationGroup | None = None
    pool = None
    results: list[SuiteResult] = []
    report: dict[str, Any] = {}
    try:
        if model is not None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            group = GenerationGroup.reserve(str(model), generation_resources(workers, device), key="eval.resources",
                                            seed=seed, backend=backend, stage="eval",
                                            engine=engine_options(backend, device, dtype, dict(backend_options or {})))
        pool = grading_pool(timeout_s, extract_mode, grade_threads, REWARD_CPUS)
        for suite in suite_list:
            result = evaluate_suite(suite, group, tokenizer, saved, template, sampling, limit, pass_at, pool, show,
                                    generations_path)
            results.append(result)
            report = write_report(out, results, meta)  # after every suite, so a long run leaves partial numbers
    finally:
        if pool is not None:
            pool.shutdown()
        if group is not None:
            group.shutdown()
        if started_ray:
            ray.shutdown()
    if show:
        print_table(results)
    return report


def evaluate_suite(suite: Suite, group: GenerationGroup | None, tokenizer: Any, saved: dict[str, dict[str, list[str]]],
                   template: str, sampling: Sampling, limit: int | None, pass_at: Sequence[int], pool: Any, show: bool,
                   generations_path: Path) -> SuiteResult:
    """Generate (or look up) one suite's samples, grade them, append them to generations.jsonl."""
    problems = suite.problems[:limit] if limit is not None else suite.problems
    result = SuiteResult(name=suite.name, kind=suite.kind, n_problems=0, k=0, metrics={}, skipped_rows=suite.skipped)
    started = time.perf_counter()
    if group is not None:
        prompts = [render(suite, p, template, tokenizer) for p in problems]
        stop = prompts[0].stop if prompts else ()
        prompt_texts: list[str | None] = [p.text for p in prompts]
        groups = group.generate(prompt_texts, replace(sampling, stop=tuple(stop)), progress=show)
        texts = [[c.text for c in completions] for completions in groups]
    else:
        by_id = saved[suite.name]
        known = {p.id for p in suite.problems}
        result.unknown_ids = sum(len(v) for i, v in by_id.items() if i not in known)
        result.missing = sum(1 for p in problems if p.id not in by_id)
        problems = [p for p in problems if p.id in by_id]
        if not problems:
            raise DataError(f"no saved response has the id of a problem of suite {suite.name!r} "
                            f"({sum(len(v) for v in by_id.values())} responses for it, with other ids)")
        texts = [by_id[p.id] for p in problems]
        prompt_texts = [None] * len(problems)
    result.generate_s = time.perf_counter() - started

    started = time.perf_counter()
    flat = [(i, t) for i, samples in enumerate(texts) for t in samples]
    graded_flat = grade_all(suite.kind, [t for _, t in flat], [problems[i].reference for i, _ in flat], pool,
                            description=f"grading {suite.name}", progress=show)
    graded: list[list[Graded]] = [[] for _ in problems]
    for (i, _), g in zip(flat, graded_flat):
        graded[i].append(g)
    result.grade_s = time.perf_counter() - started
    result.grader_errors = sum(1 for g in graded_flat if g.error)
    result.n_problems = len(problems)
    result.n_samples = len(flat)
    result.k, result.metrics = suite_metrics(suite, graded, pass_at)
    if result.missing:
        result.notes.append(f"{result.missing} problems had no saved response and are not counted")
    append_generations(generations_path, generation_rows(suite, problems, prompt_texts, texts, graded))
    return result


def generation_rows(suite: Suite, problems: list[Problem], prompts: list[str | None], texts: list[list[str]],
                    graded: list[list[Graded]]) -> list[dict[str, Any]]:
    rows = []
    for problem, prompt, samples, grades in zip(problems, prompts, texts, graded):
        for index, (text, g) in enumerate(zip(samples, grades)):
            row: dict[str, Any] = {"suite": suite.name, "id": problem.id, "sample": index}
            if prompt is not None and index == 0:
                row["prompt"] = prompt  # once per problem: prompts can be long
            row.update(response=text, extracted=g.answer, score=g.score)
            if suite.kind == "math":
                row["gold"] = problem.reference["answer"]
            if g.error:
                row["error"] = g.error
            if g.info:
                row["grader"] = g.info
            rows.append(row)
    return rows


def load_report(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "report.json").read_text())
