"""`policy_objective` against numbers worked out by hand from the formulas (PPO's clipped surrogate, Schulman's
KL estimators, truncated importance sampling, GSPO's sequence ratio), on two samples of three tokens:

    sample 0: advantage +1, two loss tokens (the third is padding)
    sample 1: advantage −2, three loss tokens
    ratios π/π_old:  [[1.5, 1.0, ·], [0.5, 1.1, 1.0]],  clip range [0.8, 1.2]
"""

from __future__ import annotations

import math

import pytest
import torch

from rl.config import GrpoConfig
from rl.train.objective import policy_objective

MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
RATIOS = torch.tensor([[1.5, 1.0, 9.0], [0.5, 1.1, 1.0]])  # 9.0: a padding token, which must not count
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
ENTROPY = torch.tensor([[1.0, 2.0, 100.0], [0.5, 0.5, 2.0]])
# per-token surrogates max(−ρA, −clip(ρ)A):  sample 0: −1.2 (clipped), −1.0;  sample 1: 1.6 (clipped), 2.2, 2.0
PG_PER_SAMPLE = (-1.2 - 1.0) / 2, (1.6 + 2.2 + 2.0) / 3


def objective(log_probs: torch.Tensor | None = None, ref: torch.Tensor | None = None,
              rollout: torch.Tensor | None = None, num_samples: int = 2, num_tokens: int = 5, **grpo: object):
    lp = OLD + RATIOS.log() if log_probs is None else log_probs
    return policy_objective(
        GrpoConfig(**{"eps_clip": 0.2, **grpo}), log_probs=lp, entropy=ENTROPY, old_log_probs=OLD, advantages=ADV,
        mask=MASK, ref_log_probs=ref, rollout_log_probs=OLD if rollout is None else rollout,
        num_samples=num_samples, num_tokens=num_tokens)


def test_the_clipped_surrogate_by_hand():
    loss, m = objective()
    assert m["pg_loss"].item() == pytest.approx((-1.1 + 5.8 / 3) / 2)
    assert loss.item() == pytest.approx((-1.1 + 5.8 / 3) / 2)
    assert m["clipfrac"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)  # one clipped token in each sample
    assert "kl" not in m


def test_denominators_are_the_global_batchs():
    # the two samples are half of a global batch of four: their share of its loss is half their mean
    assert objective(num_samples=4)[0].item() == pytest.approx((-1.1 + 5.8 / 3) / 4)
    # per-token: every loss token of the global batch weighs the same
    assert objective(calculate_per_token_loss=True)[0].item() == pytest.approx((-1.2 - 1.0 + 1.6 + 2.2 + 2.0) / 5)
    assert objective(calculate_per_token_loss=True, num_tokens=10)[0].item() == pytest.approx(3.6 / 10)


def test_an_entropy_bonus_lowers_the_loss():
    loss, m = objective(entropy_coef=0.1)
    entropy = ((1.0 + 2.0) / 2 + (0.5 + 0.5 + 2.0) / 3) / 2  # 1.25
    assert m["entropy"].item() == pytest.approx(entropy)
    assert loss.item() == pytest.approx((-1.1 + 5.8 / 3) / 2 - 0.1 * entropy)  # L = pg − c·H: maximizes H


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_the_kl_term_by_hand(kind):
    diff = torch.tensor([[0.2, 0.4, 5.0], [0.1, -0.1, 0.4]])  # log π − log π_ref
    lp = OLD + RATIOS.log()
    per_token = {"k1": lambda d: d, "k2": lambda d: d * d / 2, "k3": lambda d: math.exp(-d) - 1 + d}[kind]
    kl = ((per_token(0.2) + per_token(0.4)) / 2 + (per_token(0.1) + per_token(-0.1) + per_token(0.4)) / 3) / 2
    loss, m = objective(log_probs=lp, ref=lp - diff, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type=kind)
    assert m["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx((-1.1 + 5.8 / 3) / 2 + 0.5 * kl, rel=1e-5)  # a penalty: it adds
    # use_kl_loss off: the KL is still reported, and not in the loss
    loss, m = objective(log_probs=lp, ref=lp - diff, kl_loss_type=kind)
    assert m["kl"].item() == pytest.approx(kl, rel=1e-5) and loss.item() == pytest.approx((-1.1 + 5.8 / 3) / 2)


def test_truncated_importance_sampling_by_hand():
    # w = clamp(π_old/π_rollout, 0.5, 2): 3 → 2, 0.25 → 0.5, the rest as they are
    w = torch.tensor([[3.0, 0.8, 1.0], [0.25, 1.0, 1.5]])
    loss, _ = objective(rollout=OLD - w.log(), use_tis=True, tis_clip=2.0, tis_clip_low=0.5)
    expected = ((-1.2 * 2.0 - 1.0 * 0.8) / 2 + (1.6 * 0.5 + 2.2 * 1.0 + 2.0 * 1.5) / 3) / 2
    assert loss.item() == pytest.approx(expected)


def test_gspo_clips_and_differentiates_the_sequence_ratio():
    # s_i = exp(mean of the sample's token log-ratios): sample 0 √1.5 = 1.2247, clipped to 1.2 (A > 0);
    # sample 1 (0.5·1.1·1)^(1/3) = 0.8193, inside the range: −A·s = 2·0.8193 on each of its tokens
    s1 = 0.55 ** (1 / 3)
    lp = (OLD + RATIOS.log()).requires_grad_()
    loss, m = objective(log_probs=lp, advantage_estimator="gspo")
    assert loss.item() == pytest.approx((-1.2 + 2 * s1) / 2, rel=1e-5)
    assert m["clipfrac"].item() == pytest.approx(0.5)  # every token of sample 0, none of sample 1
    loss.backward()
    # d/d log π_t of (2·s1)/2 = s1 · 1/3 on each of sample 1's tokens; sample 0 is clipped, padding is not a token
    assert torch.allclose(lp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 3, s1 / 3, s1 / 3]]), atol=1e-6)
