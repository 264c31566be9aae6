"""Loss terms of the policy update: pure functions on per-token tensors.

Token tensors are [B, T] padded (or any shape, for the element-wise terms), with `mask` true on tokens that
get a loss. The log-probs are of the sampled tokens: `log_probs` under the policy being trained,
`old_log_probs` under the policy that the advantages were computed for, `ref_log_probs` under the frozen
reference, `rollout_log_probs` as reported by the rollout engine.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]


def approx_kl(log_probs: Tensor, ref_log_probs: Tensor, kind: KLKind) -> Tensor:
    """Per-token estimators of KL(π‖π_ref) (Schulman, "Approximating KL divergence"), with
    log r = log π_ref(x) − log π(x):

        k1 = −log r                    (unbiased, high variance, can be negative)
        k2 = ½ (log r)²
        k3 = r − 1 − log r             (unbiased, non-negative)
        low_var_kl = clamp(k3, −10, 10)
    """
    log_ratio = ref_log_probs.float() - log_probs.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind in ("k3", "low_var_kl"):
        k3 = log_ratio.exp() - 1 - log_ratio
        return k3.clamp(-10, 10) if kind == "low_var_kl" else k3
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2, k3 or low_var_kl")


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, per token, with an asymmetric clip range (DAPO's clip-higher) and optional
    dual clip. With ρ = exp(log_probs − old_log_probs) and A the advantage:

        L = max(−ρA, −clip(ρ, 1 − eps_clip, 1 + eps_clip_high)·A)
        dual clip (eps_clip_c > 1), where A < 0:  L = min(L, −eps_clip_c·A)

    Returns (L, clipfrac) where clipfrac is 1 on tokens whose clipped term was the larger (the clip bound).
    """
    ratio = (log_probs - old_log_probs).exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).to(loss.dtype)
    if eps_clip_c is not None:
        if eps_clip_c <= 1:
            raise ValueError(f"dual-clip needs eps_clip_c > 1, got {eps_clip_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -eps_clip_c * advantages), loss)
    return loss, clipfrac


def sequence_log_probs(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level ratio, expressed as log-probs to pass to `policy_loss`.

        log s_i = (1/|y_i|) Σ_t mask_t · (log π(y_t) − log π_old(y_t))
        returns old_log_probs + log s_i on every token of sample i

    so that `policy_loss` sees the ratio s_i (with its gradient) at each token: the whole sequence is
    clipped together, as in GSPO (arXiv:2507.18071).
    """
    m = mask.to(log_probs.dtype)
    seq = ((log_probs - old_log_probs) * m).sum(-1) / m.sum(-1).clamp(min=1)
    return old_log_probs + seq.unsqueeze(-1).expand_as(log_probs)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position: H = logsumexp(z) − Σ_v softmax(z)_v · z_v."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def tis_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, clip: float, clip_low: float = 0.0) -> Tensor:
    """Truncated importance sampling (`use_tis`): correct for the rollout engine sampling from a slightly
    different distribution than the trainer computes.

        w_t = clamp(exp(old_log_probs − rollout_log_probs), clip_low, clip),  no gradient

    The policy loss of each token is multiplied by w_t.
    """
    return (old_log_probs - rollout_log_probs).exp().clamp(clip_low, clip).detach()


def sample_mean(values: Tensor, mask: Tensor, num_samples: int | None = None) -> Tensor:
    """Per-sample reduction (the default): each sample's masked token mean, averaged over samples.

        L = (1/N) Σ_i (Σ_t m_it x_it) / max(Σ_t m_it, 1)

    N = `num_samples` (the global batch, when the batch is split in micro-batches) or the rows here.
    """
    m = mask.to(values.dtype)
    per_sample = (values * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_sample.sum() / (values.shape[0] if num_samples is None else num_samples)


def token_mean(values: Tensor, mask: Tensor, num_tokens: int | None = None) -> Tensor:
    """Per-token reduction (`calculate_per_token_loss`): every loss token weighs the same.

        L = Σ_it m_it x_it / T

    T = `num_tokens` (the global batch's loss tokens, when split in micro-batches) or the tokens here.
    """
    m = mask.to(values.dtype)
    total = m.sum().clamp(min=1) if num_tokens is None else num_tokens
    return (values * m).sum() / total


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token (`value_clip`), and where the clipped term was the larger:

        V_c = V_old + clamp(V − V_old, −ε_v, ε_v),   L_t = ½ · max((V − R)², (V_c − R)²)
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float()
