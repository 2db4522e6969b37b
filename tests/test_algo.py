"""GRPO's pure functions against values worked out by hand (numbers in the comments)."""
import math

import pytest
import torch

from r1pipe.algo import (
    aggregate,
    clipped_surrogate,
    dynamic_sampling_keep,
    group_advantages,
    grpo_loss,
    kl_k3,
    overlong_filter_mask,
    overlong_soft_penalty,
    token_logprobs_and_entropy,
)


def test_group_advantages_with_std():
    # group 1: [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> +-0.5*sqrt(3) = +-0.8660
    # group 2: [2, 2, 2, 2]: all equal -> 0
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]), group_size=4, eps=0.0 + 1e-12)
    h = 0.5 * math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([h, -h, -h, h, 0, 0, 0, 0]))


def test_a_group_of_equal_rewards_gets_exactly_zero_advantage():
    # float32: mean([0.1] * 8) is not 0.1 to the last bit; the residue over (std 0 + eps) was -0.0074 per row
    for value in (0.1, 0.3, 0.7, 1.1):
        for normalize_std in (True, False):
            adv = group_advantages(torch.tensor([value] * 8 + [0.0, 1.0] * 4), group_size=8, normalize_std=normalize_std)
            assert adv[:8].eq(0).all(), (value, normalize_std, adv[:8])
            assert adv[8:].ne(0).all()


def test_group_advantages_without_std_is_dr_grpo():
    # [3, 1]: mean 2 -> [1, -1]; [0, 0, 3] would be another size; [5, 1]: mean 3 -> [2, -2]
    adv = group_advantages(torch.tensor([3.0, 1, 5, 1]), group_size=2, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1, 2, -2]))


def test_group_advantages_rejects_ragged():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), group_size=2)


def test_kl_k3_by_hand():
    # logp = log 0.5, ref = log 0.25: log r = log 0.5 = -0.6931; k3 = 0.5 + 0.6931 - 1 = 0.19315
    k = kl_k3(torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0]))
    torch.testing.assert_close(k, torch.tensor([0.5 + math.log(2) - 1, 0.0]))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_kl_k3_is_unbiased_for_kl():
    # E_{x~p}[k3] = KL(p || q) exactly, over a 3-symbol distribution
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    expected_k3 = (p * kl_k3(p.log(), q.log())).sum()
    kl = (p * (p / q).log()).sum()
    torch.testing.assert_close(expected_k3, kl)


def test_clipped_surrogate_symmetric_and_clip_higher():
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.1, 0.5, 0.9 with advantages +1, +1, -1, -1
    logp = torch.tensor([[math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipped = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.2)
    # r=1.5,A=+1: -min(1.5, 1.2) = -1.2 (clipped); r=1.1: -1.1; r=0.5,A=-1: -min(-0.5, -0.8) = 0.8 (clipped); r=0.9: 0.9
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.1, 0.8, 0.9]]))
    assert clipped.tolist() == [[True, False, True, False]]
    # DAPO clip-higher: eps_high=0.28 lets r=1.5 count up to 1.28; the low side is unchanged
    loss_hi, _ = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss_hi, torch.tensor([[-1.28, -1.1, 0.8, 0.9]]))
    # the pessimistic side is never clipped: r=0.5 with A=+1 -> -0.5, r=1.5 with A=-1 -> 1.5
    loss_p, clipped_p = clipped_surrogate(torch.tensor([[math.log(0.5), math.log(1.5)]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(loss_p, torch.tensor([[-0.5, 1.5]]))
    assert not clipped_p.any()


def test_clipped_surrogate_gradient_is_zero_when_clipped():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]))
    loss.sum().backward()
    # d(-r*A)/d logp = -r*A = -1.1 for the unclipped token; 0 for the clipped one
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregate_token_mean():
    # (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert aggregate(LOSS, MASK, "token-mean").item() == pytest.approx(2.5)
    assert aggregate(LOSS, MASK, "token-mean", num_tokens=8).item() == pytest.approx(1.25)


def test_aggregate_seq_mean_token_mean():
    # seq 1: 6 / 3 = 2; seq 2: 4 / 1 = 4; mean = 3
    assert aggregate(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_aggregate_dr_grpo_constant():
    # 10 / (2 seqs * 4) = 1.25 with T as the constant; 10 / (2 * 10) = 0.5 with budget 10
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(1.25)
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_constant=10).item() == pytest.approx(0.5)


def test_aggregate_unknown_mode_is_named():
    with pytest.raises(ValueError, match="token-sum"):
        aggregate(LOSS, MASK, "token-sum")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    full = aggregate(loss, mask, agg)
    parts = sum(
        aggregate(loss[i : i + 2], mask[i : i + 2], agg, num_tokens=mask.sum(), num_seqs=6, norm_constant=5)
        for i in range(0, 6, 2)
    )
    torch.testing.assert_close(parts, full)


def test_grpo_loss_combines_pg_and_kl():
    # one sequence of two tokens, on-policy (ratio 1), A = 2, logp = ref except token 2
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.25)]])
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), ref_logp=ref, kl_coef=0.1)
    # pg per token = -2; kl = [0, 0.19315]; token-mean = (-4 + 0.1 * 0.19315) / 2
    k = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx((-4 + 0.1 * k) / 2)
    assert stats["tokens"] == 2 and stats["clipped"] == 0
    assert stats["kl"] == pytest.approx(k) and stats["ratio"] == pytest.approx(2.0)


def test_grpo_loss_beta_zero_needs_no_reference():
    logp = torch.zeros(2, 3)
    loss, stats = grpo_loss(logp, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 3), kl_coef=0.0)
    assert loss.item() == pytest.approx(0.0) and stats["kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 3), kl_coef=0.1)


def test_grpo_loss_clip_fraction_counts_by_side():
    logp = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), 0.0]])
    _, stats = grpo_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    assert (stats["clipped"], stats["clipped_high"], stats["clipped_low"]) == (2, 1, 1)


def test_dynamic_sampling_drops_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    assert dynamic_sampling_keep(rewards, group_size=2).tolist() == [False, False, True, False]


def test_overlong_filter_and_soft_penalty():
    assert overlong_filter_mask(torch.tensor([True, False])).tolist() == [0.0, 1.0]
    # budget 20 with a 4-token cache: free up to 16; 18 -> (16 - 18) / 4 = -0.5; 20 -> -1; 25 -> -1
    pen = overlong_soft_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        overlong_soft_penalty(torch.tensor([1]), max_len=4, cache_len=8)


def test_token_logprobs_and_entropy_by_hand():
    # logits [0, log 3] -> probs [1/4, 3/4]; at T=2 logits [0, log 3 / 2] -> probs [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    s = math.sqrt(3.0)
    logp_t, _ = token_logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=2.0)
    assert logp_t.item() == pytest.approx(math.log(1 / (1 + s)))
    # the log-prob carries the gradient d log p_1 / d logits = onehot(1) - p; the entropy is a statistic only
    leaf = logits.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(leaf, torch.tensor([[1]]))
    logp.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[[-0.25, 0.25]]]))
    assert not ent.requires_grad


def test_tis_weights_by_hand():
    from r1pipe.algo import tis_weights

    # pi_old / pi_engine = 0.5 / 0.25 = 2 -> 2 (cap 3); 0.9 / 0.1 = 9 -> capped at 3; 0.2 / 0.4 = 0.5 -> 0.5
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    engine = torch.log(torch.tensor([[0.25, 0.1, 0.4]]))
    w, clipped = tis_weights(old, engine, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 3.0, 0.5]]))
    assert clipped.tolist() == [[False, True, False]]
    with pytest.raises(ValueError):
        tis_weights(old, engine, cap=0.0)


def test_tis_weight_scales_only_the_policy_gradient_term():
    # one token, advantage 1, logp == old_logp (ratio 1, unclipped): pg = -1; weight 0.5 -> -0.5, KL untouched
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    kl = math.exp(math.log(0.5)) - math.log(0.5) - 1  # k3 with ref - logp = log(1/2)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 1), ref_logp=ref, kl_coef=0.1,
                        tis_weight=torch.tensor([[0.5]]))
    assert loss.item() == pytest.approx(-0.5 + 0.1 * kl)


def test_draft_loss_is_kl_to_the_detached_target():
    from r1pipe.algo import draft_loss

    # target probs [1/4, 3/4], draft probs [1/2, 1/2]: KL = 1/4 log(1/2) + 3/4 log(3/2)
    target = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0]]], requires_grad=True)
    draft = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    loss = draft_loss(draft, target, torch.tensor([[1.0, 0.0]]))  # second position masked out
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    loss.backward()
    assert target.grad is None and draft.grad is not None
    assert draft_loss(target.detach(), target.detach(), torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-7)


def test_engine_sampler_and_trainer_share_the_tempered_logprob_function():
    from r1pipe.algo import token_logprobs
    from r1pipe.engine.sampler import SamplingTensors
    from r1pipe.engine.sampler import token_logprobs as engine_logprobs

    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([1, 5, 10])
    st = SamplingTensors.build([0.7, 1.3, 0.0], [1.0] * 3, [-1] * 3, vocab_size=11)
    trainer, _ = token_logprobs_and_entropy(logits.unsqueeze(0), tokens.unsqueeze(0), temperature=0.7)
    # rows at their own temperature (greedy rows report T = 1), identical bits on both sides
    assert engine_logprobs(logits, tokens, st)[0] == trainer[0, 0]
    assert torch.equal(engine_logprobs(logits, tokens, st), token_logprobs(logits, tokens, torch.tensor([[0.7], [1.3], [1.0]])))
    # one temperature for the whole batch (the engine's common case): the float the trainer divides by
    for temperature in (0.7, 1.0):
        shared = SamplingTensors.uniform(3, temperature, 1.0, -1, vocab_size=11)
        assert shared.divisor == temperature
        expected, _ = token_logprobs_and_entropy(logits.unsqueeze(0), tokens.unsqueeze(0), temperature=temperature)
        assert torch.equal(engine_logprobs(logits, tokens, shared), expected[0])
    assert SamplingTensors.uniform(3, 0.0, 1.0, -1, vocab_size=11).divisor == 1.0  # greedy: log-probs at T = 1
