"""The objectives of one micro-batch (the policy's, and PPO's critic's), shared by every training backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from rl.losses import approx_kl, policy_loss, sample_mean, sequence_log_probs, tis_weights, token_mean, value_loss

if TYPE_CHECKING:
    from rl.config import GrpoConfig


def policy_objective(
    grpo: GrpoConfig,
    *,
    log_probs: Tensor,
    entropy: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_log_probs: Tensor | None,
    rollout_log_probs: Tensor,
    num_samples: int,
    num_tokens: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of a micro-batch and its metrics, all [b, T] token tensors.

        L = R(pg · w_tis) − entropy_coef · R(H) + kl_loss_coef · R(KL(π‖π_ref))

    pg is PPO's clipped surrogate (on GSPO's sequence ratio for `gspo`), w_tis the truncated importance
    weights (`use_tis`, else 1), and R the reduction: per-token mean over `num_tokens` with
    `calculate_per_token_loss`, else the per-sample mean over `num_samples`. Both denominators are the
    global batch's, so the losses of all micro-batches (and ranks) add up to the global batch's loss.
    Metrics are reduced the same way: summed over micro-batches they give the batch means.
    """
    reduce = reduction(grpo, mask, num_samples, num_tokens)
    gspo = grpo.advantage_estimator == "gspo"
    ratio_log_probs = sequence_log_probs(log_probs, old_log_probs, mask) if gspo else log_probs
    eps_high = grpo.eps_clip if grpo.eps_clip_high is None else grpo.eps_clip_high
    pg, clipfrac = policy_loss(ratio_log_probs, old_log_probs, advantages, grpo.eps_clip, eps_high, grpo.eps_clip_c)
    if grpo.use_tis:
        pg = pg * tis_weights(old_log_probs, rollout_log_probs, grpo.tis_clip, grpo.tis_clip_low)
    pg_loss, entropy_mean = reduce(pg), reduce(entropy)
    loss = pg_loss - grpo.entropy_coef * entropy_mean
    metrics = {"pg_loss": pg_loss.detach(), "entropy": entropy_mean.detach(), "clipfrac": reduce(clipfrac).detach()}
    if ref_log_probs is not None:
        kl = reduce(approx_kl(log_probs, ref_log_probs, grpo.kl_loss_type))
        if grpo.use_kl_loss and grpo.kl_loss_coef:
            loss = loss + grpo.kl_loss_coef * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def value_objective(grpo: GrpoConfig, *, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                    num_samples: int, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's critic loss of a micro-batch, L = R(½ · max((V − G)², (V_c − G)²)) (`rl.losses.value_loss`, clip
    `value_clip`), reduced as the policy's loss is."""
    reduce = reduction(grpo, mask, num_samples, num_tokens)
    per_token, clipped = value_loss(values, old_values, returns, grpo.value_clip)
    loss = reduce(per_token)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": reduce(clipped).detach()}


def reduction(grpo: GrpoConfig, mask: Tensor, num_samples: int, num_tokens: int) -> Callable[[Tensor], Tensor]:
    """Per-token mean over the global batch's `num_tokens` with `calculate_per_token_loss`, else the
    per-sample mean over its `num_samples`."""
    if grpo.calculate_per_token_loss:
        return lambda x: token_mean(x, mask, num_tokens)
    return lambda x: sample_mean(x, mask, num_samples)
