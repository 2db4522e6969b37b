"""The GRPO step's pieces alone, without Ray: score, collect (dynamic sampling with refills), the
RolloutBatch's trainer rows and engine log-probs, the step's rollout metrics, and the update that
leaves zero-advantage rows out (an in-process PolicyWorker as the trainer's policy)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from r1pipe.config import make_config
from r1pipe.stages.base import StageContext
from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.grpo import GRPOTrainer, PromptStream, Scorer, rollout_metrics
from r1pipe.stages.sections import Workers
from r1pipe.workers import Completion, PolicyConfig, PolicyWorker, RolloutBatch

from test_grpo_weight_sync import tiny_model


def count_a(text: str, reference: dict) -> float:
    return float(text.count("a"))


def trainer(tmp_path: Path, overrides: dict | None = None) -> GRPOTrainer:
    """`overrides` keyed as in a recipe section ({"rollout.group_size": 4})."""
    values = {"data.train_path": "unused", "data.heldout_path": "unused", "rollout.prompts_per_step": 2,
              "rollout.group_size": 2, "rollout.max_tokens": 4, "rewards.weights": {},
              "rewards.extra": {f"{__name__}:count_a": 1.0}, "rewards.accuracy_reward": "count_a", **(overrides or {})}
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "rl", recipe=OmegaConf.create({}), seed=0)
    t = GRPOTrainer(make_config(GRPOConfig, values, "rl"), ctx)
    t.scorer = Scorer({}, dict(t.cfg.rewards.extra), Workers())  # extra rewards only: no reward pool, no Ray
    t.timings = {"rollout": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0}
    return t


def completion(text: str, prompt=(5, 6), finish="stop") -> Completion:
    ids = [ord(c) % 7 + 3 for c in text]
    return Completion(prompt_ids=list(prompt), token_ids=ids, text=text, logprobs=[-0.5] * len(ids), finish_reason=finish)


def test_score_writes_rewards_and_the_soft_overlong_penalty(tmp_path):
    t = trainer(tmp_path, {"rollout.overlong": "soft", "rollout.overlong_cache": 2})
    groups = [[completion("aa"), completion("abcd", finish="length")]]
    batch = RolloutBatch(problems=[], completions=[])
    rewards = t.score([{"prompt": "p", "answer": "x"}], groups, batch)
    # 4 tokens at budget 4 with a 2-token cache: (2 - 4) / 2 = -1 penalty
    assert rewards == [2.0, 0.0] and [c.reward for c in groups[0]] == rewards
    assert batch.all_rewards == rewards and batch.components["count_a"] == [2.0, 1.0] and batch.generated_tokens == 6


def test_collect_refills_groups_dropped_by_dynamic_sampling(tmp_path, monkeypatch):
    t = trainer(tmp_path, {"rollout.max_refill_rounds": 2})
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
    # the budget counts every completion sampled, the dropped groups' too: 2 per problem seen, 1 token each
    assert t.budget == {"optimizer_steps": 0, "sampled_sequences": 2 * stream.position, "sampled_tokens": 2 * stream.position}
    assert stream.position > 2


def test_rollout_batch_rows_and_engine_logprobs_on_the_target_grid():
    a, b = completion("ab", prompt=(5, 6, 7)), completion("abc", prompt=(5,))
    batch = RolloutBatch(problems=[{}], completions=[a, b])
    rows = batch.train_batch(pad_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7] + a.token_ids, [5] + b.token_ids + [0]]
    # row 0: prompt of 3, so targets 3 and 4 (positions 2, 3) are completion tokens
    assert rows.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    engine = batch.engine_logprobs(tuple(rows.response_mask.shape))
    torch.testing.assert_close(engine, -0.5 * rows.response_mask)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rows_with_zero_advantage_skip_the_model_and_leave_the_gradient_unchanged(tmp_path, loss_agg):
    path = tiny_model(tmp_path / "model")
    # four groups of two: "aa"/"a" and "ab"/"b" differ (count_a 2 vs 1, 1 vs 0); "cc"/"dd" and "a"/"ba" tie
    texts = [("aa", "a"), ("cc", "dd"), ("ab", "bcd"), ("a", "ba")]
    batch = RolloutBatch(problems=[{}] * 4, completions=[completion(t) for pair in texts for t in pair])
    for c in batch.completions:
        c.reward = count_a(c.text, {})
    updates = {}
    for skip in (False, True):
        t = trainer(tmp_path / str(skip), {"rollout.prompts_per_step": 4, "algorithm.skip_zero_advantage": skip,
                                           "algorithm.loss_agg": loss_agg})
        t.pad_id = 0
        t.policy = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, loss_agg=loss_agg, norm_constant=4.0,
                                                         freeze_router_bias=True, micro_batch_size=2,
                                                         share_prompts=False))  # rows, not packed prompts, are counted
        rows_seen: list[int] = []
        t.policy.model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
        metrics = t.train(batch)
        assert metrics["advantage/zero_share"] == 0.5
        updates[skip] = (t.policy, sum(rows_seen), metrics)
    (full, full_rows, a), (skipped, skipped_rows, b) = updates[False], updates[True]
    assert (full_rows, skipped_rows) == (8, 4)  # the tied groups' rows never reach the model
    assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6
    for (name, pa), pb in zip(full.model.named_parameters(), skipped.model.parameters()):  # the step's gradients
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert (pa.grad - pb.grad).abs().max() <= 1e-6 * max(1.0, float(pa.grad.abs().max())), name


def test_a_batch_with_no_advantage_still_steps_the_optimizer(tmp_path):
    """AdamW moves parameters on a zero gradient (its momentum): skipping every row must not skip that."""
    path = tiny_model(tmp_path / "model")
    batch = RolloutBatch(problems=[{}] * 2, completions=[completion(t) for t in ("aa", "bb", "cc", "dd")])
    for c, r in zip(batch.completions, (1.0, 0.0, 1.0, 1.0)):
        c.reward = r
    t = trainer(tmp_path, {"rollout.prompts_per_step": 2})
    t.pad_id = 0
    t.policy = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, freeze_router_bias=True))
    t.train(batch)  # one informative group: a real step, AdamW has momentum
    before = [p.detach().clone() for p in t.policy.model.parameters()]
    for c in batch.completions:
        c.reward = 1.0
    metrics = t.train(batch)
    assert metrics["advantage/zero_share"] == 1.0 and metrics["grad_norm"] == 0.0
    assert t.budget["optimizer_steps"] == 2  # a step that skipped every row still counts
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(t.policy.model.parameters(), before)]
    assert max(moved) > 0


def test_the_recipes_surrogate_and_advantage_reach_the_update(tmp_path):
    """`rl.algorithm.loss` and `rl.algorithm.advantage` change the step: on-policy (one update, ratio 1) the three surrogates
    give one gradient; against older log-probs they differ. RLOO's advantages are GRPO's without the std."""
    path = tiny_model(tmp_path / "model")
    batch = RolloutBatch(problems=[{}] * 2, completions=[completion(t) for t in ("aab", "b", "ab", "bbb")])
    for c in batch.completions:
        c.reward = count_a(c.text, {})
    norms = {}
    for loss in ("grpo", "gspo", "cispo"):
        for advantage in ("grpo", "rloo"):
            t = trainer(tmp_path / f"{loss}-{advantage}", {"rollout.prompts_per_step": 2, "algorithm.loss": loss,
                                                          "algorithm.advantage": advantage})
            t.pad_id = 0
            t.policy = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, loss=loss, freeze_router_bias=True))
            metrics = t.train(batch)
            rows = batch.train_batch(0)
            every_other = (torch.arange(rows.response_mask.shape[1]) % 2).float()
            older = t.policy.logprobs(rows) - 0.4 * every_other * rows.response_mask  # ratios e^0.4 and 1
            stale = t.policy.train_step(rows, older, torch.tensor([1.0, -1.0, 1.0, -1.0]), None,
                                        num_tokens=float(rows.response_mask.sum()), num_seqs=4.0)
            norms[loss, advantage] = (metrics["grad_norm"], stale["grad_norm"], metrics["advantage/abs_mean"])
    # on-policy: one gradient whatever the surrogate
    for advantage in ("grpo", "rloo"):
        on = [norms[loss, advantage][0] for loss in ("grpo", "gspo", "cispo")]
        assert max(on) - min(on) <= 1e-5 * max(on) and max(on) > 0
    # off-policy, token ratios e^0.4 = 1.49 and 1: GRPO drops the tokens above 1.28 with A > 0, GSPO clips
    # on each sequence's mean ratio (about e^0.2, inside), CISPO keeps every token at weight min(r, 1.28)
    stale = sorted(norms[loss, "grpo"][1] for loss in ("grpo", "gspo", "cispo"))
    assert stale[1] > stale[0] * 1.001 and stale[2] > stale[1] * 1.001  # float noise is ~1e-7
    # groups [2, 0] and [1, 0]: GRPO's |A| is 1/sqrt(1/2)... = 0.7071 each; RLOO's 2/1 * |r - mean| = 2 and 1
    assert norms["grpo", "grpo"][2] == pytest.approx(0.70710, abs=1e-4)
    assert norms["grpo", "rloo"][2] == pytest.approx(1.5, abs=1e-6)
