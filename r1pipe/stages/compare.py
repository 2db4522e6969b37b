"""Stage `compare`: one table of models scored by earlier eval stages on the same suite (e.g. the
distillation teacher, a distilled student, the same student trained by RL alone).

`rows` maps a label to an eval stage; each row gets that stage's pass@1 on `suite` with its Wilson 95%
interval, the model it scored, the stage that trained that model with its steps and its training budget
(optimizer_steps; tokens: the target tokens an SFT stage trained on, or the completion tokens a GRPO
stage sampled), and the difference in points to the `reference` row. `budgets` checks that an RL row
trained with at least an SFT row's optimizer steps and tokens; `margins` gives the paired difference
in pass@1 of two rows over the problems both eval stages scored (their generations.jsonl), with a 95%
interval and the sign-test p-value (r1pipe.eval.stats). Writes comparison.json ({"suite", "reference",
"rows", "budgets", "margins"}) and comparison.md; the run's summary.json carries the rows as `comparison`.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from r1pipe.errors import ConfigError, DataError
from r1pipe.eval.report import problem_scores
from r1pipe.eval.stats import paired_comparison, wilson_interval
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import CompareConfig


def trained_by(outputs: dict[str, dict], model_path: str) -> tuple[Optional[str], dict]:
    """The earliest stage whose output model is `model_path` (an eval stage only re-reports it), with its
    outputs ({} when no stage of the run made it)."""
    for name, out in outputs.items():
        if out.get("model_path") == model_path and "report_path" not in out:
            return name, out
    return None, {}


def training_tokens(out: dict) -> Optional[int]:
    """The tokens a stage trained with: an SFT stage's trained (target) tokens, a GRPO stage's sampled ones."""
    return out["trained_tokens"] if out.get("trained_tokens") is not None else out.get("sampled_tokens")


def comparison_table(cfg: CompareConfig, outputs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for label, stage in cfg.rows.items():
        out = outputs.get(stage)
        if out is None or "suites" not in out:
            raise ConfigError(f"compare.rows.{label}={stage!r}: not an earlier eval stage (earlier stages: {', '.join(outputs)})")
        report = out["suites"].get(cfg.suite)
        if report is None:
            raise ConfigError(f"compare.rows.{label}={stage!r}: no suite {cfg.suite!r} (it scored {', '.join(out['suites'])})")
        source, trainer = trained_by(outputs, out["model_path"])
        n = report.get("n_problems")
        table[label] = {"eval_stage": stage, "model_path": out["model_path"], "trained_by": source,
                        "steps": trainer.get("steps"), "optimizer_steps": trainer.get("optimizer_steps"),
                        "tokens": training_tokens(trainer), "pass@1": report["pass@1"], "n_problems": n,
                        "pass@1_interval": None if n is None else list(wilson_interval(min(report["pass@1"] * n, n), n))}
    if cfg.reference is not None:
        ref = table[cfg.reference]["pass@1"]
        for row in table.values():
            row["points_vs_reference"] = round(100.0 * (row["pass@1"] - ref), 1)
    return table


def budget_checks(cfg: CompareConfig, table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per `budgets` pair: both rows' optimizer steps and tokens, and whether the RL row's are at least the
    SFT row's on both (None when a figure is unknown)."""
    checks = []
    for rl, sft in cfg.budgets.items():
        check: dict[str, Any] = {"rl": rl, "sft": sft}
        known = True
        holds = True
        for key in ("optimizer_steps", "tokens"):
            a, b = table[rl][key], table[sft][key]
            check[f"rl_{key}"], check[f"sft_{key}"] = a, b
            known = known and a is not None and b is not None
            holds = holds and known and a >= b
        check["holds"] = holds if known else None
        checks.append(check)
    return checks


def margin(cfg: CompareConfig, outputs: dict[str, dict], a: str, b: str) -> dict[str, Any]:
    """Row a's pass@1 minus row b's, paired over the problems of the suite both eval stages scored (per problem
    the mean score over its samples): the difference with its paired normal 95% interval, the problems only
    one scored higher on (a_only, b_only: solved by one only, on one 0/1 sample each) and their sign-test p-value."""
    scores = []
    for label in (a, b):
        path = Path(outputs[cfg.rows[label]]["report_path"]).parent / "generations.jsonl"
        if not path.is_file():
            raise DataError(f"compare.margins [{a}, {b}]: {path} is missing (the per-problem scores of {label!r})")
        scores.append(problem_scores(path, cfg.suite))
    ids = [pid for pid in scores[0] if pid in scores[1]]
    if not ids:
        raise DataError(f"compare.margins [{a}, {b}]: no problem of suite {cfg.suite!r} was scored by both")
    return {"a": a, "b": b, **paired_comparison([scores[0][i] for i in ids], [scores[1][i] for i in ids])}


def _count(value: Optional[int]) -> str:
    return "-" if value is None else f"{value:,}"


def to_markdown(table: dict[str, dict[str, Any]], suite: str, reference: Optional[str],
                budgets: Sequence[dict[str, Any]] = (), margins: Sequence[dict[str, Any]] = ()) -> str:
    """The table (pass@1 with its 95% interval, the training stage and budget, points vs the reference), then
    the budget checks and the margins as short lists."""
    head = (f"| model | {suite} pass@1 [95% CI] | trained by | steps | optimizer steps | tokens |"
            + (f" points vs {reference} |" if reference else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, row in table.items():
        interval = row.get("pass@1_interval")
        ci = f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else ""
        line = (f"| {label} | {100 * row['pass@1']:.1f}%{ci} | {row['trained_by'] or '-'} | {_count(row['steps'])} | "
                f"{_count(row['optimizer_steps'])} | {_count(row['tokens'])} |")
        if reference:
            line += f" {row['points_vs_reference']:+.1f} |"
        lines.append(line)
    lines += ["", "tokens: the target tokens an SFT stage trained on, or the completion tokens a GRPO stage sampled."]
    if budgets:
        lines += ["", "Budgets (RL at least SFT in optimizer steps and tokens):"]
        for c in budgets:
            verdict = {True: "holds", False: "does NOT hold", None: "unknown"}[c["holds"]]
            lines.append(f"- {c['rl']} vs {c['sft']}: optimizer steps {_count(c['rl_optimizer_steps'])} vs "
                         f"{_count(c['sft_optimizer_steps'])}, tokens {_count(c['rl_tokens'])} vs "
                         f"{_count(c['sft_tokens'])}: {verdict}")
    if margins:
        lines += ["", f"Margins (paired difference in {suite} pass@1, 95% interval; sign test on the problems one side won):"]
        for m in margins:
            ci = f" [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]" if m["low"] is not None else ""
            lines.append(f"- {m['a']} - {m['b']}: {100 * m['difference']:+.1f} points{ci} over {m['n']} problems; "
                         f"{m['a_only']} vs {m['b_only']} won by one side only, p = {m['p_value']:.3g}")
    return "\n".join(lines) + "\n"


def run_compare(cfg: CompareConfig, ctx: StageContext) -> dict:
    table = comparison_table(cfg, ctx.outputs)
    budgets = budget_checks(cfg, table)
    for c in budgets:
        if not c["holds"]:
            why = "does not hold" if c["holds"] is False else "cannot be checked (a budget is unknown)"
            print(f"compare: warning: the budget of {c['rl']!r} >= {c['sft']!r} {why}: optimizer steps "
                  f"{c['rl_optimizer_steps']} vs {c['sft_optimizer_steps']}, tokens {c['rl_tokens']} vs {c['sft_tokens']}",
                  file=sys.stderr)
    margins = [margin(cfg, ctx.outputs, a, b) for a, b in cfg.margins]
    result = {"suite": cfg.suite, "reference": cfg.reference, "rows": table, "budgets": budgets, "margins": margins}
    (ctx.stage_dir / "comparison.json").write_text(json.dumps(result, indent=1))
    markdown = to_markdown(table, cfg.suite, cfg.reference, budgets, margins)
    (ctx.stage_dir / "comparison.md").write_text(markdown)
    print(markdown)
    return {"comparison": table, "budgets": budgets, "margins": margins,
            "comparison_path": str(ctx.stage_dir / "comparison.md")}
