from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import (
    discounted_returns,
    gae,
    group_normalize,
    ppo_token_rewards,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
    whiten,
)


def test_group_normalize_by_hand():
    # group 1: [1, 0, 1, 0] mean 0.5, unbiased std sqrt(1/3); group 2: [2, 4, 6, 8] mean 5, std sqrt(20/3)
    a = group_normalize(torch.tensor([1.0, 0, 1, 0, 2, 4, 6, 8]), 4)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(20 / 3)
    expected = [0.5 / s1, -0.5 / s1, 0.5 / s1, -0.5 / s1, -3 / s2, -1 / s2, 1 / s2, 3 / s2]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-5)


def test_group_normalize_without_std():
    a = group_normalize(torch.tensor([1.0, 0, 1, 0, 2, 4, 6, 8]), 4, std_normalize=False)
    assert a.tolist() == [0.5, -0.5, 0.5, -0.5, -3, -1, 1, 3]


def test_equal_rewards_and_singletons_give_zero_not_nan():
    a = group_normalize(torch.tensor([1.0, 1, 1, 0, 0, 0]), 3)
    assert torch.equal(a, torch.zeros(6))
    b = group_normalize(torch.tensor([5.0, 1.0, 3.0]), [1, 2])
    assert not b.isnan().any() and b[0] == 0
    assert torch.allclose(b[1:], torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-6))


def test_unequal_and_empty_groups():
    a = group_normalize(torch.tensor([0.0, 1.0, 3.0, 3.0, 6.0]), [2, 0, 3])
    assert torch.allclose(a[:2], torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-6))
    assert torch.allclose(a[2:], torch.tensor([-1.0, -1.0, 2.0]) / (math.sqrt(3.0) + 1e-6))
    assert group_normalize(torch.tensor([]), 4).numel() == 0


def test_integer_rewards_and_bad_groups():
    assert group_normalize(torch.tensor([1, 0]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalize(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="do not add up"):
        group_normalize(torch.zeros(4), [1, 2])


def test_whiten_over_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(values, mask, eps=0.0)
    std = torch.tensor([1.0, 2, 3, 4]).std()  # unbiased, 100 and 5 are masked out
    assert torch.allclose(w, torch.tensor([[-1.5, -0.5, 0.0], [0.5, 1.5, 0.0]]) / std)
    assert torch.equal(whiten(values, torch.zeros_like(mask)), torch.zeros_like(values))


def test_discounted_returns():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    assert torch.allclose(discounted_returns(r, 0.5), torch.tensor([[1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2.0]]))


def test_reinforce_plus_plus_returns_by_hand():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = reinforce_plus_plus_returns(torch.tensor([1.0, 0.0]), kl, mask, kl_coef=0.1, gamma=0.9)
    # sample 0 token rewards: [-0.01, -0.02, -0.03 + 1]
    r0 = [-0.01, -0.02, 0.97]
    g0 = [r0[0] + 0.9 * r0[1] + 0.81 * r0[2], r0[1] + 0.9 * r0[2], r0[2], 0.0]
    g1 = [-0.04 + 0.9 * -0.05, -0.05, 0.0, 0.0]
    assert torch.allclose(g, torch.tensor([g0, g1]), atol=1e-6)
    with pytest.raises(ValueError, match="mask is all zero"):
        reinforce_plus_plus_returns(torch.tensor([1.0]), kl[:1], torch.zeros(1, 4), 0.1, 1.0)


def test_reinforce_plus_plus_baseline_by_hand():
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    a = reinforce_plus_plus_baseline_advantages(torch.tensor([1.0, 0.0]), kl, mask, kl_coef=0.5,
                                                n_samples_per_prompt=2)
    assert torch.allclose(a, torch.tensor([[0.5 - 0.05, 0.5 - 0.1], [-0.5 - 0.15, 0.0]]))


def test_gae_against_its_recursion_and_over_tool_tokens():
    from rl.advantages import gae

    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lambd=0.8)
    d2 = 1.0 - 0.6
    d1 = 0.9 * 0.6 - 0.4
    d0 = 0.9 * 0.4 - 0.2
    a2, a1 = d2, d1 + 0.72 * d2
    expected = torch.tensor([[d0 + 0.72 * a1, a1, a2]])
    assert torch.allclose(adv, expected) and torch.allclose(ret, expected + v)
    # λ = 1, γ = 1: the advantage is the return minus the value, the return the final reward
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lambd=1.0)
    assert torch.allclose(ret, torch.ones(1, 3)) and torch.allclose(adv, 1 - v)
    # a masked token in the middle (tool output) is skipped over: same as if it were not there
    with_tool, _ = gae(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.2, 9.0, 0.4, 0.6]]),
                       torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lambd=0.8)
    assert torch.allclose(with_tool[:, [0, 2, 3]], expected) and with_tool[0, 1] == 0


def test_ppo_token_rewards_put_the_reward_last_and_the_kl_everywhere():
    from rl.advantages import ppo_token_rewards

    out = ppo_token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3, 0.0]]),
                            torch.tensor([[1, 1, 1, 0]]), kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.1, 2.0 - 0.15, 0.0]]))


def test_the_estimator_named_in_the_config_is_the_one_applied():
    from rl.advantages import estimate, needs_kl, whiten
    from rl.config import GrpoConfig

    rewards, mask = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    kl, values = torch.full((4, 3), 0.1) * mask, torch.full((4, 3), 0.2)
    grpo = GrpoConfig()
    assert not needs_kl(grpo)
    adv, returns = estimate(grpo, rewards, mask, 2)
    assert returns is None and torch.equal(adv, group_normalize(rewards, 2)[:, None] * mask)
    rpp = GrpoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, normalize_advantages=True)
    assert needs_kl(rpp)
    adv, _ = estimate(rpp, rewards, mask, 2, kl=kl)
    assert torch.equal(adv, whiten(reinforce_plus_plus_returns(rewards, kl, mask, 0.1, rpp.gamma), mask))
    ppo = GrpoConfig(advantage_estimator="ppo", kl_coef=0.0)
    assert not needs_kl(ppo) and needs_kl(GrpoConfig(advantage_estimator="ppo", kl_coef=0.05))
    adv, returns = estimate(ppo, rewards, mask, 2, values=values)
    expected = gae(ppo_token_rewards(rewards, torch.zeros_like(mask), mask, 0.0), values, mask, ppo.gamma, ppo.lambd)
    assert torch.equal(adv, expected[0]) and torch.equal(returns, expected[1])
