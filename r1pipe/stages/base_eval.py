"""Held-out accuracy of a model on problem rows, by the one evaluation path of the project:
completions from the rollout engine (RolloutWorker, i.e. r1pipe.engine.LLM, stopping after
`</answer>`; transformers' generate for a dense Hugging Face student) graded by the rewards' accuracy reward (the last answer, math_equal). The pretrain
stage's base check and GRPO's held-out accuracy both come from here, so the "base accuracy" and
the "final accuracy" of a run are the same metric.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from r1pipe.causal_lm import V3, model_type_of
from r1pipe.eval.backends import GenerationConfig, HFBackend
from r1pipe.rewards import build_reward_fn
from r1pipe.workers.rollout import RolloutWorker


def share_solved(values: list[float]) -> float:
    """Accuracy from per-problem accuracy-reward values (> 0.5 = solved)."""
    return sum(1.0 for v in values if v > 0.5) / max(len(values), 1)


@dataclass
class BaseAccuracy:
    accuracy: float  # share of problems the accuracy reward counts as solved
    worked_fraction: float  # share of completions that work steps (think is not the bare guess)
    worked_accuracy: float  # accuracy among worked completions (nan if none)
    samples: list[dict]


def measure_accuracy(
    model_dir: str | Path, rows: list[dict], temperature: float, max_new_tokens: int, seed: int = 0,
    stop: tuple[str, ...] = ("</answer>",), guess_think: str = "guess",
) -> BaseAccuracy:
    """Accuracy of the checkpoint in `model_dir` on problem rows {"prompt", "answer"}, one completion each
    (greedy at temperature 0, else sampled with seed + row index)."""
    grade = build_reward_fn({"accuracy": 1.0})
    samples = []
    for row, text in zip(rows, _completions(model_dir, rows, temperature, max_new_tokens, seed, stop)):
        accuracy = float(grade(text, dict(row)).components["accuracy"])
        worked = bool(re.search(r"<think>", text)) and f"<think> {guess_think} </think>" not in text
        samples.append({"id": row["id"], "completion": text, "answer": row["answer"], "correct": accuracy > 0.5,
                        "worked": worked})
    worked = [s for s in samples if s["worked"]]
    return BaseAccuracy(
        accuracy=share_solved([float(s["correct"]) for s in samples]),
        worked_fraction=len(worked) / max(len(samples), 1),
        worked_accuracy=share_solved([float(s["correct"]) for s in worked]) if worked else float("nan"),
        samples=samples,
    )


def _completions(model_dir: str | Path, rows: list[dict], temperature: float, max_new_tokens: int, seed: int,
                 stop: tuple[str, ...]) -> list[str]:
    """One completion per row: r1pipe's engine for its DeepSeek-V3 (seeded per row), transformers'
    generate (the eval's HFBackend, seeded per call) for a dense Hugging Face model."""
    prompts = [r["prompt"] for r in rows]
    if model_type_of(model_dir) != V3:
        backend = HFBackend(model_dir, batch_size=64)
        config = GenerationConfig(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, seed=seed)
        return [group[0] for group in backend.generate(prompts, list(stop), config)]
    engine = RolloutWorker(str(model_dir), {}, seed)
    groups = engine.generate(prompts, 1, temperature, max_new_tokens, seeds=[seed + i for i in range(len(prompts))],
                             stop=list(stop) or None)
    return [group[0].text for group in groups]
