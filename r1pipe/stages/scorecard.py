"""Stage `scorecard`: every model of the run on the same held-out problems, per domain.

For each earlier stage that produced a model (or the stages named in `models`), greedy answers to
the first `per_domain` held-out rows of each domain (math, code, ...) are scored with per-row
reward routing (math: the accuracy reward; code: the code reward, tests run in the sandbox) and
the readability figures of r1pipe.rewards.readability: format compliance, language consistency
of the chain of thought, share of responses mixing scripts, mean length in tokens. The run's
summary.json carries the table as `per_stage`; `<stage>.answers.jsonl` keeps every answer (row id,
domain, solved, text), so two runs can be compared problem by problem. Results per model are
written as they finish, so an interrupted scorecard resumes with the models it has not scored yet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1pipe.data import load_prompt_rows
from r1pipe.data.jsonl import write_jsonl
from r1pipe.data.tokenizer import load_tokenizer
from r1pipe.errors import ConfigError
from r1pipe.rewards import domain_of, missing_reference, solved
from r1pipe.rewards.readability import readability
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import ScorecardConfig
from r1pipe.stages.scored_sampling import Sampling, ScoredSampler
from r1pipe.workers.cluster import ray_init


def domain_scores(rows: list, samples: list, reward_names: list[str]) -> dict[str, Any]:
    """Accuracy per domain (graded by the row's grader) and readability over all rows, one greedy sample each."""
    per: dict[str, list[float]] = {}
    for row, (s,) in zip(rows, samples):
        per.setdefault(domain_of(row.reference), []).append(float(solved(s.components, row.reference, reward_names)))
    figures = readability([s.text for (s,) in samples], [r.reference for r in rows], [s.num_tokens for (s,) in samples])
    return {"accuracy": {d: round(sum(v) / len(v), 4) for d, v in sorted(per.items())},
            "n": {d: len(v) for d, v in sorted(per.items())}, **figures.to_dict()}


def run_scorecard(cfg: ScorecardConfig, ctx: StageContext) -> dict:
    names = list(cfg.models) or [n for n, out in ctx.outputs.items() if out.get("model_path")]
    missing = [n for n in names if not (ctx.outputs.get(n) or {}).get("model_path")]
    if missing or not names:
        raise ConfigError(f"scorecard.models: {missing or 'none'}: no earlier stage model (stages with one: "
                         f"{[n for n, o in ctx.outputs.items() if o.get('model_path')]})")
    source = cfg.heldout_path or ctx.output(cfg.heldout_from)
    if not source:
        raise ConfigError(f"scorecard: no held-out set (set heldout_path or run a stage that outputs {cfg.heldout_from!r})")
    weights = dict(cfg.reward_weights)
    first_model = ctx.outputs[names[0]]["model_path"]
    rows, report = load_prompt_rows(str(source), load_tokenizer(first_model), template=cfg.template,
                                    check_reference=lambda ref: missing_reference(weights, ref), option_prefix="scorecard.",
                                    log=lambda line: print(f"scorecard: {line}"))
    taken: dict[str, int] = {}
    picked = []
    for r in rows:
        d = domain_of(r.reference)
        if taken.get(d, 0) < cfg.per_domain:
            taken[d] = taken.get(d, 0) + 1
            picked.append(r)
    out_dir = Path(ctx.stage_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ray_init(ctx.recipe)
    table: dict[str, dict] = {}
    for name in names:
        done = out_dir / f"{name}.json"
        if done.exists():
            table[name] = json.loads(done.read_text())
            continue
        sampling = Sampling(k=1, temperature=0.0, max_tokens=cfg.max_tokens, stop=tuple(cfg.stop), seed=ctx.seed)
        sampler = ScoredSampler(ctx.outputs[name]["model_path"], sampling, weights, dict(cfg.reward_options),
                                resources=cfg.resources, key="scorecard.resources")
        try:
            samples = [s for chunk in sampler.run(picked, cfg.chunk_size) for s in chunk.samples]
        finally:
            sampler.shutdown()
        table[name] = domain_scores(picked, samples, list(weights))
        write_jsonl(out_dir / f"{name}.answers.jsonl",
                    ({"id": r.id, "domain": domain_of(r.reference), "solved": solved(s.components, r.reference, list(weights)),
                      "text": s.text} for r, (s,) in zip(picked, samples)))
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(table[name], indent=1))
        tmp.rename(done)
        print(f"scorecard: {name}: {table[name]}")
    (out_dir / "scorecard.json").write_text(json.dumps(table, indent=1))
    return {"scorecard": table, "scorecard_path": str(out_dir / "scorecard.json"), "data": report.to_dict()}
