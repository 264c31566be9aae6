"""Evaluation datasets: rewards and pass@k of fresh samples from the current policy."""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples (Chen et al. 2021):
    1 − C(n − c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(name: str, rewards: list[float], n_per_prompt: int) -> dict[str, float]:
    """`eval/<name>/reward_mean`, and pass@1 and pass@n where a sample is correct when its reward > 0."""
    r = np.asarray(rewards, dtype=float).reshape(-1, n_per_prompt)
    correct = (r > 0).sum(axis=1)
    out = {f"eval/{name}/reward_mean": float(r.mean())}
    for k in sorted({1, n_per_prompt}):
        out[f"eval/{name}/pass@{k}"] = float(np.mean([pass_at_k(n_per_prompt, int(c), k) for c in correct]))
    return out
