from __future__ import annotations

import math

import pytest
import torch

from rl.losses import (
    approx_kl,
    entropy_from_logits,
    policy_loss,
    sample_mean,
    sequence_log_probs,
    tis_weights,
    token_mean,
)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # log r = ref - lp = [-0.5, 1.0]
    assert torch.allclose(approx_kl(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert torch.allclose(approx_kl(lp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0])
    assert torch.allclose(approx_kl(lp, ref, "k3"), k3)
    assert torch.allclose(approx_kl(lp, ref, "low_var_kl"), k3)
    # e^x - 1 - x >= 0 for every x: k3 never rewards moving away from the reference
    many = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)) * 3
    assert (approx_kl(many[0], many[1], "k3") >= 0).all()


def test_low_var_kl_is_clamped_and_unknown_kind_fails():
    assert approx_kl(torch.tensor([-30.0]), torch.tensor([0.0]), "low_var_kl").item() == 10.0
    assert approx_kl(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() > 1e12
    with pytest.raises(ValueError, match="unknown KL estimator"):
        approx_kl(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_of_identical_policies_is_zero():
    lp = torch.randn(5)
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        assert torch.allclose(approx_kl(lp, lp, kind), torch.zeros(5))


def test_policy_loss_by_hand():
    old = torch.zeros(4)
    ratios = torch.tensor([1.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipfrac = policy_loss(ratios.log(), old, adv, eps_clip=0.2, eps_clip_high=0.28)
    # 1.5, A>0: max(-1.5, -1.28) = -1.28 (clipped)   1.5, A<0: max(1.5, 1.28) = 1.5
    # 0.5, A<0: max(0.5, 0.8) = 0.8 (clipped)         1.1, A>0: max(-2.2, -2.2) = -2.2
    assert torch.allclose(loss, torch.tensor([-1.28, 1.5, 0.8, -2.2]))
    assert clipfrac.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_dual_clip_bounds_negative_advantages():
    old = torch.zeros(2)
    lp = torch.tensor([5.0, 5.0]).log()
    loss, _ = policy_loss(lp, old, torch.tensor([-1.0, 1.0]), 0.2, 0.2, eps_clip_c=3.0)
    assert torch.allclose(loss, torch.tensor([3.0, -1.2]))  # min(5, 3) for A<0; A>0 untouched
    with pytest.raises(ValueError, match="eps_clip_c > 1"):
        policy_loss(lp, old, torch.ones(2), 0.2, 0.2, eps_clip_c=0.5)


def test_policy_gradient_is_zero_when_clipped():
    lp = torch.tensor([math.log(1.5)], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1), torch.ones(1), 0.2, 0.2)
    loss.sum().backward()
    assert lp.grad.item() == 0.0


def test_sequence_level_ratio_of_gspo():
    lp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    seq = sequence_log_probs(lp, old, mask)
    # mean log-ratio over the two masked tokens: (0.5 - 0.5) / 2 = 0
    assert torch.allclose(seq - old, torch.zeros(1, 3))
    (seq - old)[0, 0].backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.5, 0.5, 0.0]]))


def test_entropy_from_logits():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    p = torch.tensor([0.7, 0.2, 0.1])
    assert torch.allclose(entropy_from_logits(p.log()), -(p * p.log()).sum())


def test_tis_weights_are_capped_and_detached():
    old = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    w = tis_weights(old, torch.tensor([-2.0, 0.5, 0.0]), clip=2.0, clip_low=0.7)
    assert torch.allclose(w, torch.tensor([2.0, 0.7, 1.0])) and not w.requires_grad


def test_reductions_by_hand():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sample_mean(x, mask).item() == pytest.approx((2.0 + 2.0) / 2)
    assert token_mean(x, mask).item() == pytest.approx(6.0 / 3)
    # in a micro-batch of a larger global batch the denominators are the global ones
    assert sample_mean(x, mask, num_samples=4).item() == pytest.approx(1.0)
    assert token_mean(x, mask, num_tokens=6).item() == pytest.approx(1.0)
    assert token_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_micro_batch_reductions_add_up_to_the_global_one():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).int()
    mask[:, 0] = 1
    for reduce, kw in ((sample_mean, {"num_samples": 6}), (token_mean, {"num_tokens": int(mask.sum())})):
        whole = reduce(x, mask)
        parts = reduce(x[:2], mask[:2], **kw) + reduce(x[2:], mask[2:], **kw)
        assert torch.allclose(whole, parts)


def test_value_loss_clips_the_move_from_the_old_values():
    from rl.losses import value_loss

    old = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([0.1, 0.5, -0.5])
    returns = torch.tensor([0.2, 1.0, 1.0])
    loss, clipped = value_loss(values, old, returns, clip=0.2)
    # inside the clip range: plain squared error; moved towards the target beyond it: the clipped (larger) one
    # counts; moved away from it: the unclipped one is the larger
    assert torch.allclose(loss, torch.tensor([0.5 * 0.01, 0.5 * 0.64, 0.5 * 2.25]))
    assert clipped.tolist() == [0.0, 1.0, 0.0]
