"""The GRPO step's pieces alone, without Ray: score, collect (dynamic sampling with refills), the
RolloutBatch's trainer rows and engine log-probs, and the step's rollout metrics."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.grpo import GRPOTrainer, PromptStream, Scorer, rollout_metrics
from r1pipe.workers import Completion, RolloutBatch


def count_a(text: str, reference: dict) -> float:
    return float(text.count("a"))


def trainer(tmp_path: Path, **overrides) -> GRPOTrainer:
    fields = dict(train_path="unused", heldout_path="unused", prompts_per_step=2, group_size=2, max_tokens=4,
                  reward_weights={}, extra_rewards={f"{__name__}:count_a": 1.0}, accuracy_reward="count_a")
    fields.update(overrides)
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "rl", recipe=OmegaConf.create({}), seed=0)
    t = GRPOTrainer(GRPOConfig(**fields), ctx)
    t.scorer = Scorer({}, dict(t.cfg.extra_rewards), 1)  # extra rewards only: no reward pool, no Ray
    t.timings = {"rollout": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0}
    return t


def completion(text: str, prompt=(5, 6), finish="stop") -> Completion:
    ids = [ord(c) % 7 + 3 for c in text]
    return Completion(prompt_ids=list(prompt), token_ids=ids, text=text, logprobs=[-0.5] * len(ids), finish_reason=finish)


def test_score_writes_rewards_and_the_soft_overlong_penalty(tmp_path):
    t = trainer(tmp_path, overlong="soft", overlong_cache=2)
    groups = [[completion("aa"), completion("abcd", finish="length")]]
    batch = RolloutBatch(problems=[], completions=[])
    rewards = t.score([{"prompt": "p", "answer": "x"}], groups, batch)
    # 4 tokens at budget 4 with a 2-token cache: (2 - 4) / 2 = -1 penalty
    assert rewards == [2.0, 0.0] and [c.reward for c in groups[0]] == rewards
    assert batch.all_rewards == rewards and batch.components["count_a"] == [2.0, 1.0] and batch.generated_tokens == 6


def test_collect_refills_groups_dropped_by_dynamic_sampling(tmp_path, monkeypatch):
    t = trainer(tmp_path, max_refill_rounds=2)
    rows = [{"id": str(i), "prompt": f"p{i}", "answer": "x"} for i in range(6)]
    # problems p0, p2, p4 get two equal completions (dropped), the others two different ones (kept)
    fake = lambda prompts, n, temperature, seeds: [
        [completion("a"), completion("a" if int(p[1:]) % 2 == 0 else "b")] for p in prompts]
    monkeypatch.setattr(t, "_generate", fake)
    stream = PromptStream(rows, seed=0)
    batch = t.collect(stream)
    assert len(batch.problems) == 2 and all(int(p["id"]) % 2 == 1 for p in batch.problems)
    assert len(batch) == 4 and batch.groups_seen == stream.position
    metrics = rollout_metrics(batch, "count_a")
    assert metrics["groups_kept"] == pytest.approx(2 / batch.groups_seen)
    assert metrics["response_length/mean"] == 1.0


def test_rollout_batch_rows_and_engine_logprobs_on_the_target_grid():
    a, b = completion("ab", prompt=(5, 6, 7)), completion("abc", prompt=(5,))
    batch = RolloutBatch(problems=[{}], completions=[a, b])
    rows = batch.train_batch(pad_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7] + a.token_ids, [5] + b.token_ids + [0]]
    # row 0: prompt of 3, so targets 3 and 4 (positions 2, 3) are completion tokens
    assert rows.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    engine = batch.engine_logprobs(tuple(rows.response_mask.shape))
    torch.testing.assert_close(engine, -0.5 * rows.response_mask)
