"""Advantage estimators: pure functions on tensors.

Shapes: `rewards` is [B] (one scalar per sample); token-level tensors are [B, T] padded, with `mask` [B, T]
true on the response tokens that get a loss. Samples of one prompt group are contiguous in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rl.config import GrpoConfig


def _group_ids(n: int, group_sizes: int | Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(group_sizes, int):
        if group_sizes <= 0 or n % group_sizes:
            raise ValueError(f"{n} rewards do not split into groups of {group_sizes}")
        sizes = torch.full((n // group_sizes,), group_sizes, dtype=torch.long, device=device)
    else:
        sizes = torch.as_tensor(list(group_sizes), dtype=torch.long, device=device)
        if (sizes < 0).any() or int(sizes.sum()) != n:
            raise ValueError(f"group sizes {list(group_sizes)} do not add up to the {n} rewards")
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes), sizes


def group_normalize(
    rewards: Tensor, n_samples_per_prompt: int | Sequence[int], std_normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO's group-relative advantage of each sample.

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)     (std_normalize)
        A_i =  r_i − mean_g(r)                          (otherwise, Dr. GRPO / REINFORCE++-baseline)

    g is the sample's prompt group: consecutive runs of `n_samples_per_prompt` samples, or the given group
    sizes (unequal sizes allowed, empty groups ignored). std is the unbiased sample standard deviation; a
    group of one sample, or of equal rewards, has std 0 and advantage 0 (no NaN).
    """
    r = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    if r.numel() == 0:
        return r.clone()
    ids, sizes = _group_ids(r.numel(), n_samples_per_prompt, r.device)
    count = sizes.clamp(min=1).to(r.dtype)
    mean = torch.zeros(len(sizes), dtype=r.dtype, device=r.device).index_add_(0, ids, r) / count
    centered = r - mean[ids]
    if not std_normalize:
        return centered
    sq = torch.zeros(len(sizes), dtype=r.dtype, device=r.device).index_add_(0, ids, centered**2)
    std = torch.where(sizes > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return centered / (std[ids] + eps)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Batch whitening over the masked tokens (`normalize_advantages`):

        x̂_t = (x_t − μ) / (σ + eps),  μ, σ² the mean and unbiased variance of x over tokens with mask_t = 1

    Masked-out positions come back as 0.
    """
    m = mask.to(values.dtype)
    n = m.sum()
    if n == 0:
        return torch.zeros_like(values)
    mean = (values * m).sum() / n
    var = (((values - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)
    return (values - mean) / (var.sqrt() + eps) * m


def discounted_returns(token_rewards: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + γ·G_{t+1}, G_T = 0, along the last dimension."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[..., 0])
    for t in range(token_rewards.shape[-1] - 1, -1, -1):
        running = token_rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def _last_token_reward(rewards: Tensor, mask: Tensor) -> Tensor:
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values
    if (last < 0).any():
        raise ValueError("a sample has no response token with a loss (its mask is all zero)")
    out = torch.zeros(mask.shape, dtype=rewards.dtype if rewards.is_floating_point() else torch.float32,
                      device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards.to(out.dtype)
    return out


def reinforce_plus_plus_returns(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float) -> Tensor:
    """REINFORCE++ (arXiv:2501.03262) token returns, before whitening.

        r_t = −kl_coef · kl_t · mask_t  + [t = last response token] · r
        G_t = Σ_{k≥t} γ^{k−t} r_k

    Returned masked: positions without a loss are 0.
    """
    m = mask.to(kl.dtype)
    token_rewards = -kl_coef * kl * m + _last_token_reward(rewards, mask).to(kl.dtype)
    return discounted_returns(token_rewards, gamma) * m


def reinforce_plus_plus_baseline_advantages(
    rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, n_samples_per_prompt: int | Sequence[int]
) -> Tensor:
    """REINFORCE++-baseline, before whitening: the group mean is the baseline, the KL a per-token penalty.

        A_t = (r − mean_g(r)) − kl_coef · kl_t,  masked
    """
    centered = group_normalize(rewards, n_samples_per_prompt, std_normalize=False).to(kl.dtype)
    return (centered[:, None] - kl_coef * kl) * mask.to(kl.dtype)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lambd: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (PPO, `advantage_estimator = "ppo"`) along the response tokens:

        δ_t = r_t + γ·V_{t'} − V_t,   A_t = δ_t + γλ·A_{t'},   R_t = A_t + V_t (the critic's target)

    t' is the next token with mask 1 (tokens with mask 0, tool output, are skipped over as if absent);
    past the last one V = A = 0. Returns (A, R), 0 where the mask is 0.
    """
    m = mask.bool()
    advantages, returns = torch.zeros_like(values), torch.zeros_like(values)
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    for t in range(values.shape[-1] - 1, -1, -1):
        a = token_rewards[..., t] + gamma * next_value - values[..., t] + gamma * lambd * next_advantage
        advantages[..., t] = torch.where(m[..., t], a, 0.0)
        returns[..., t] = torch.where(m[..., t], a + values[..., t], 0.0)
        next_value = torch.where(m[..., t], values[..., t], next_value)
        next_advantage = torch.where(m[..., t], a, next_advantage)
    return advantages, returns


def ppo_token_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO's token rewards: the sample's reward on its last loss token, a KL penalty on every one.

        r_t = [t = last response token] · r − kl_coef · kl_t · mask_t
    """
    return _last_token_reward(rewards, mask).to(kl.dtype) - kl_coef * kl * mask.to(kl.dtype)


def needs_kl(g: GrpoConfig) -> bool:
    """Whether `g.advantage_estimator` takes the per-token KL to the reference (REINFORCE++ and its baseline
    variant; PPO with a KL penalty), for which the policy's log-probs and the reference's are computed first."""
    return g.advantage_estimator.startswith("reinforce_plus_plus") or (g.advantage_estimator == "ppo" and
                                                                       bool(g.kl_coef))


def estimate(g: GrpoConfig, rewards: Tensor, mask: Tensor, n_samples_per_prompt: int, *, kl: Tensor | None = None,
             values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The per-token advantages of `g.advantage_estimator`, whitened with `g.normalize_advantages`, and for PPO
    the critic's returns (else None):

        grpo, gspo                    group_normalize(r) on every loss token
        ppo                           gae(ppo_token_rewards(r, kl)), `values` the critic's ([B, T])
        reinforce_plus_plus           reinforce_plus_plus_returns(r, kl)
        reinforce_plus_plus_baseline  reinforce_plus_plus_baseline_advantages(r, kl)

    `kl` ([B, T], masked) where `needs_kl(g)`; PPO without a KL penalty takes none.
    """
    returns = None
    if g.advantage_estimator in ("grpo", "gspo"):
        per_sample = group_normalize(rewards, n_samples_per_prompt, std_normalize=not g.disable_grpo_std_normalization)
        advantages = per_sample[:, None] * mask
    elif g.advantage_estimator == "ppo":
        assert values is not None, "PPO needs the critic's values"
        penalty = kl if kl is not None else torch.zeros_like(mask)
        advantages, returns = gae(ppo_token_rewards(rewards, penalty, mask, g.kl_coef), values, mask, g.gamma,
                                  g.lambd)
    else:
        assert kl is not None, f"{g.advantage_estimator} needs the KL to the reference"
        if g.advantage_estimator == "reinforce_plus_plus":
            advantages = reinforce_plus_plus_returns(rewards, kl, mask, g.kl_coef, g.gamma)
        else:
            advantages = reinforce_plus_plus_baseline_advantages(rewards, kl, mask, g.kl_coef, n_samples_per_prompt)
    if g.normalize_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns
