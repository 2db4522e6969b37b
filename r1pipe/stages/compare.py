"""Stage `compare`: one table of models scored by earlier eval stages on the same suite (e.g. the
distillation teacher, a distilled student, the same student trained by RL alone).

`rows` maps a label to an eval stage; each row gets that stage's pass@1 on `suite`, the model it
scored, the stage that trained that model and its optimizer steps (when the stage reports them),
and the difference in points to the `reference` row. Writes comparison.json / comparison.md; the
run's summary.json carries the table as `comparison`.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from r1pipe.errors import ConfigError
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import CompareConfig


def trained_by(outputs: dict[str, dict], model_path: str) -> tuple[Optional[str], Optional[int]]:
    """The earliest stage whose output model is `model_path` (an eval stage only re-reports it), with its steps."""
    for name, out in outputs.items():
        if out.get("model_path") == model_path and "report_path" not in out:
            return name, out.get("steps")
    return None, None


def comparison_table(cfg: CompareConfig, outputs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for label, stage in cfg.rows.items():
        out = outputs.get(stage)
        if out is None or "suites" not in out:
            raise ConfigError(f"compare.rows.{label}={stage!r}: not an earlier eval stage (earlier stages: {', '.join(outputs)})")
        report = out["suites"].get(cfg.suite)
        if report is None:
            raise ConfigError(f"compare.rows.{label}={stage!r}: no suite {cfg.suite!r} (it scored {', '.join(out['suites'])})")
        source, steps = trained_by(outputs, out["model_path"])
        table[label] = {"eval_stage": stage, "model_path": out["model_path"], "trained_by": source, "steps": steps,
                        "pass@1": report["pass@1"], "n_problems": report.get("n_problems")}
    if cfg.reference is not None:
        ref = table[cfg.reference]["pass@1"]
        for row in table.values():
            row["points_vs_reference"] = round(100.0 * (row["pass@1"] - ref), 1)
    return table


def to_markdown(table: dict[str, dict[str, Any]], suite: str, reference: Optional[str]) -> str:
    head = f"| model | {suite} pass@1 | trained by | steps |" + (f" points vs {reference} |" if reference else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, row in table.items():
        line = f"| {label} | {100 * row['pass@1']:.1f}% | {row['trained_by'] or '-'} | {row['steps'] if row['steps'] is not None else '-'} |"
        if reference:
            line += f" {row['points_vs_reference']:+.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_compare(cfg: CompareConfig, ctx: StageContext) -> dict:
    table = comparison_table(cfg, ctx.outputs)
    (ctx.stage_dir / "comparison.json").write_text(json.dumps(table, indent=1))
    markdown = to_markdown(table, cfg.suite, cfg.reference)
    (ctx.stage_dir / "comparison.md").write_text(markdown)
    print(markdown)
    return {"comparison": table, "comparison_path": str(ctx.stage_dir / "comparison.md")}
