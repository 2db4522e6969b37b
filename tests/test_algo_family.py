"""The GRPO family beyond GRPO: GSPO and CISPO surrogates, RLOO and REINFORCE++ advantages, against
values worked out by hand (numbers in the comments)."""
import math

import pytest
import torch

from r1pipe.algo import (
    batch_normalized_advantages,
    cispo_surrogate,
    clipped_surrogate,
    compute_advantages,
    group_advantages,
    grpo_loss,
    gspo_surrogate,
    rloo_advantages,
)
from r1pipe.vocab import ADVANTAGE_ESTIMATORS, POLICY_LOSSES


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # group [1, 0, 0, 1]: others' mean for a 1 is (0+0+1)/3 = 1/3 -> 2/3; for a 0 it is 2/3 -> -2/3
    # group [1, 0, 0, 0]: 1 - 0 = 1; 0 - 1/3 = -1/3;  group [5, 5, 5, 5]: all equal -> exactly 0
    adv = rloo_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0, 5, 5, 5, 5]), group_size=4)
    t = 2 / 3
    torch.testing.assert_close(adv, torch.tensor([t, -t, -t, t, 1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1():
    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.2, 0.9])
    torch.testing.assert_close(rloo_advantages(rewards, 3), 1.5 * group_advantages(rewards, 3, normalize_std=False))


def test_reinforce_pp_normalises_over_the_whole_batch():
    # [1,0,0,0, 1,1,1,0]: batch mean 0.5; unbiased std sqrt(8 * 0.25 / 7) = 0.53452 -> +-0.5 / 0.53452 = +-0.93541
    adv = batch_normalized_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0]), eps=0.0)
    a = 0.5 / math.sqrt(2 / 7)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, -a, a, a, a, -a]))
    # unlike GRPO, an all-correct group is not zero here: it is above the batch mean
    adv = batch_normalized_advantages(torch.tensor([1.0, 1, 0, 1]), eps=0.0)  # mean 0.75, std 0.5
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.5, -1.5, 0.5]))
    assert batch_normalized_advantages(torch.tensor([0.4, 0.4, 0.4])).eq(0).all()


def test_compute_advantages_dispatches_every_estimator():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1])
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr-grpo", "rloo", "reinforce++"}
    torch.testing.assert_close(compute_advantages("grpo", rewards, 4), group_advantages(rewards, 4))
    torch.testing.assert_close(compute_advantages("dr-grpo", rewards, 4), group_advantages(rewards, 4, normalize_std=False))
    torch.testing.assert_close(compute_advantages("rloo", rewards, 4), rloo_advantages(rewards, 4))
    torch.testing.assert_close(compute_advantages("reinforce++", rewards, 4), batch_normalized_advantages(rewards))
    with pytest.raises(ValueError, match="reinforce"):
        compute_advantages("ppo", rewards, 4)


def _grad(fn, logp):
    logp = logp.clone().requires_grad_(True)
    loss, clipped = fn(logp)
    (loss.sum() / loss.numel()).backward()
    return loss.detach(), clipped, logp.grad


def test_gspo_clips_on_the_length_normalised_sequence_ratio():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # token log-ratios [0.2, -0.1]: sequence log-ratio 0.05, s = e^0.05 = 1.051271 inside [0.8, 1.28]
    # A = 1: loss per token -s; gradient of the token mean: -s / 2 per token (s * dlogp, averaged)
    s = math.exp(0.05)
    loss, clipped, grad = _grad(lambda lp: gspo_surrogate(lp, old, torch.tensor([1.0]), mask, 0.2, 0.28),
                                torch.tensor([[0.2, -0.1]]))
    torch.testing.assert_close(loss, torch.tensor([[-s, -s]]))
    torch.testing.assert_close(grad, torch.tensor([[-s / 2, -s / 2]]))
    assert not clipped.any()
    # token log-ratios [0.5, 0.3]: s = e^0.4 = 1.4918 > 1.28. GRPO would clip token 1 only (e^0.3 = 1.35 > 1.28
    # too, so both here); take [0.7, 0.1]: GRPO clips token 1 (e^0.7) but not token 2 (e^0.1); GSPO, s = e^0.4,
    # clips the whole sequence: loss -1.28 on both tokens, no gradient
    lp = torch.tensor([[0.7, 0.1]])
    loss, clipped, grad = _grad(lambda x: gspo_surrogate(x, old, torch.tensor([1.0]), mask, 0.2, 0.28), lp)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -1.28]]))
    assert clipped.all() and grad.abs().sum() == 0
    _, grpo_clipped, grpo_grad = _grad(lambda x: clipped_surrogate(x, old, torch.tensor([1.0]), 0.2, 0.28), lp)
    assert grpo_clipped.tolist() == [[True, False]] and grpo_grad[0, 1] != 0
    # A = -1 with s > 1 + eps: PPO's pessimism keeps the unclipped term: loss +s, gradient +s / 2
    s = math.exp(0.4)
    loss, clipped, grad = _grad(lambda x: gspo_surrogate(x, old, torch.tensor([-1.0]), mask, 0.2, 0.28), lp)
    torch.testing.assert_close(loss, torch.tensor([[s, s]]))
    torch.testing.assert_close(grad, torch.tensor([[s / 2, s / 2]]))


def test_gspo_sequence_ratio_ignores_masked_tokens():
    # tokens [0.2, -0.1, 5.0] with the last masked: s = e^0.05, as without it
    lp = torch.tensor([[0.2, -0.1, 5.0]])
    loss, _ = gspo_surrogate(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]]), 0.2, 0.28)
    torch.testing.assert_close(loss[0, :2], torch.full((2,), -math.exp(0.05)))


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    # log-ratios [0.5, 0.0]: r = [1.6487, 1.0] -> weights [1.28, 1.0]; A = 2
    # loss -w * A * logp = [-1.28*2*0.5, -1*2*0] = [-1.28, 0]; gradient of the mean: -w * A / 2 = [-1.28, -1.0]
    old = torch.zeros(1, 2)
    loss, clipped, grad = _grad(lambda x: cispo_surrogate(x, old, torch.tensor([2.0]), 0.2, 0.28),
                                torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.0]]))
    torch.testing.assert_close(grad, torch.tensor([[-1.28, -1.0]]))
    assert clipped.tolist() == [[True, False]]
    # GRPO on the same tokens gives the clipped token no gradient at all
    _, _, grpo_grad = _grad(lambda x: clipped_surrogate(x, old, torch.tensor([2.0]), 0.2, 0.28), torch.tensor([[0.5, 0.0]]))
    assert grpo_grad[0, 0] == 0


@pytest.mark.parametrize("surrogate", POLICY_LOSSES)
def test_every_surrogate_has_the_policy_gradient_at_ratio_one(surrogate):
    # at logp == old_logp all three have gradient -A * dlogp per token (ratio 1, nothing clipped)
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -0.7, -0.2]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 3)
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, surrogate=surrogate, clip_low=0.2, clip_high=0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv.unsqueeze(-1).expand(2, 3) / 6)
    assert stats["clipped"] == 0 and stats["tokens"] == 6


def test_grpo_loss_rejects_an_unknown_surrogate():
    with pytest.raises(ValueError, match="gspo"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), surrogate="ppo")
