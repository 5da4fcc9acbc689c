"""RL losses against hand-computed values: loss, per-token gradients (which tokens get none), eps_high."""

from __future__ import annotations

import math

import pytest
import torch

from mmx.rl import policy_loss
from mmx.rl.advantages import group_advantages, informative_groups, overlong_penalty

# Two responses of three tokens; the second's last token is padding. r = pi / pi_old per token:
RATIO = [[1.5, 0.5, 1.0], [1.1, 0.7, 2.0]]
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def inputs():
    old = torch.log(torch.tensor([[0.4, 0.6, 0.5], [0.3, 0.5, 0.2]]))
    logp = (old + torch.log(torch.tensor(RATIO))).requires_grad_()
    return logp, old


def loss_and_grad(name, **cfg):
    logp, old = inputs()
    loss = policy_loss(name, logp, old, ADV, MASK, **cfg)
    loss.backward()
    return float(loss.detach()), logp.grad


def test_grpo_sample_level_ppo_clip():
    # row 0 (A=+1): -min(r, clip(r, .8, 1.2)) = -[1.2, 0.5, 1.0]; row 1 (A=-1): -min(-r, -clip(r)) = [1.1, 0.8]
    loss, grad = loss_and_grad("grpo")
    assert loss == pytest.approx(((-1.2 - 0.5 - 1.0) / 3 + (1.1 + 0.8) / 2) / 2)
    # d(-r A)/dlogp = -r A where the unclipped branch is taken; zero where the clip took over (r=1.5, A>0 and
    # r=0.7, A<0) and on padding. Sample-level: each row / its length / 2 rows.
    expected = torch.tensor([[0.0, -0.5 / 3 / 2, -1.0 / 3 / 2], [1.1 / 2 / 2, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected)


def test_dapo_clip_higher_token_level():
    # eps_high 0.28: r=1.5 still leaves the trust region; token mean over the 5 real tokens
    loss, grad = loss_and_grad("dapo")
    assert loss == pytest.approx((-1.28 - 0.5 - 1.0 + 1.1 + 0.8) / 5)
    expected = torch.tensor([[0.0, -0.5 / 5, -1.0 / 5], [1.1 / 5, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected)
    # a ratio of 1.25 is inside DAPO's bound but outside GRPO's
    logp, old = inputs()
    logp = (old + math.log(1.25)).requires_grad_()
    policy_loss("dapo", logp, old, ADV, MASK).backward()
    assert logp.grad[0, 0] != 0
    logp.grad = None
    policy_loss("grpo", logp, old, ADV, MASK).backward()
    assert logp.grad[0, 0] == 0


def test_cispo_keeps_every_token_and_caps_the_weight():
    logp, old = inputs()
    loss = policy_loss("cispo", logp, old, ADV, MASK)
    # -sg(w) A log pi with w = r (the default cap 1 + 4 is not reached, no lower bound), over the 5 tokens
    w = torch.tensor(RATIO)
    expected_loss = (-(w * ADV[:, None] * logp.detach()) * MASK).sum() / 5
    assert float(loss.detach()) == pytest.approx(float(expected_loss), rel=1e-5)
    loss.backward()
    # the gradient is -w A / N on every real token: nothing is dropped, not even r=0.7 with A<0 or r=1.5 with A>0
    torch.testing.assert_close(logp.grad, -(w * ADV[:, None]) * MASK / 5)
    assert (logp.grad[MASK.bool()] != 0).all()
    # eps_high 0.2 caps the weight of r=1.5 at 1.2 (the token still learns, with a bounded step)
    _, grad = loss_and_grad("cispo", eps_high=0.2)
    capped = torch.tensor([[1.2, 0.5, 1.0], [1.1, 0.7, 2.0]])
    torch.testing.assert_close(grad, -(capped * ADV[:, None]) * MASK / 5)
    # an explicit lower bound floors small weights (off by default, as in M1)
    _, grad = loss_and_grad("cispo", eps_low=0.2)
    assert float(grad[0, 1]) == pytest.approx(-0.8 / 5)


def test_cispo_normalises_per_group_of_responses():
    """M1 Eq. 4: 1 / sum of the group's response lengths, then the mean over prompts."""
    _, grad = loss_and_grad("cispo", group_ids=torch.tensor([0, 1]))
    w = torch.tensor(RATIO)
    expected = -(w * ADV[:, None]) * MASK / torch.tensor([[3.0], [2.0]]) / 2
    torch.testing.assert_close(grad, expected)
    _, same_group = loss_and_grad("cispo", group_ids=torch.tensor([7, 7]))
    torch.testing.assert_close(same_group, -(w * ADV[:, None]) * MASK / 5)


def test_on_policy_all_three_agree():
    """With r = 1 (one update per rollout), token-level GRPO, DAPO and CISPO give the same gradient."""
    old = torch.log(torch.tensor([[0.4, 0.6, 0.5], [0.3, 0.5, 0.2]]))
    grads = []
    for name, cfg in (("grpo", {"aggregation": "token"}), ("dapo", {}), ("cispo", {})):
        logp = old.clone().requires_grad_()
        policy_loss(name, logp, old, ADV, MASK, **cfg).backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_stats_kl_and_errors():
    logp, old = inputs()
    _, stats = policy_loss("grpo", logp, old, ADV, MASK, return_stats=True)
    assert stats["dropped_fraction"] == pytest.approx(2 / 5) and stats["clipped_fraction"] == pytest.approx(2 / 5)
    _, stats = policy_loss("cispo", logp, old, ADV, MASK, return_stats=True, eps_high=0.2)
    assert stats["dropped_fraction"] == 0 and stats["clipped_fraction"] == pytest.approx(1 / 5)
    assert stats["trust_region_masked_fraction"] == pytest.approx(2 / 5)  # what M1 Eq. 7 would have dropped
    assert stats["ratio_max"] == pytest.approx(1.5)
    # KL (k3) against a reference equal to the policy is zero; against another it is positive
    base = policy_loss("cispo", logp, old, ADV, MASK)
    same = policy_loss("cispo", logp, old, ADV, MASK, kl_coef=0.5, ref_logp=logp.detach())
    assert float(same.detach()) == pytest.approx(float(base.detach()))
    _, stats = policy_loss("cispo", logp, old, ADV, MASK, kl_coef=0.5, ref_logp=old, return_stats=True)
    assert stats["kl"] > 0
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        policy_loss("ppo", logp, old, ADV, MASK)
    with pytest.raises(ValueError, match="'epsilon_high'"):
        policy_loss("cispo", logp, old, ADV, MASK, epsilon_high=5.0)
    with pytest.raises(ValueError, match="kl_coef needs ref_logp"):
        policy_loss("cispo", logp, old, ADV, MASK, kl_coef=0.1)


def test_advantages_dynamic_sampling_and_overlong_penalty():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    adv = group_advantages(rewards, groups)
    assert adv[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)  # (R - 0.5) / 0.5
    assert adv[2:4].tolist() == [0.0, 0.0]  # equal rewards: nothing to learn
    std = torch.tensor([0.0, 0.5, 1.0]).std(unbiased=False)
    assert adv[4:].tolist() == pytest.approx(((torch.tensor([0.0, 0.5, 1.0]) - 0.5) / std).tolist(), abs=1e-5)
    assert group_advantages(rewards, groups, std_normalize=False)[:2].tolist() == [0.5, -0.5]
    assert informative_groups(rewards, groups).tolist() == [True, True, False, False, True, True, True]
    assert [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100, 120)] == [0.0, 0.0, -0.5, -1.0, -1.0]
