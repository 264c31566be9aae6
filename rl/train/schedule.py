"""Learning-rate schedule of `[optimizer]`: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, style: str, warmup: int, decay_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

        warmup (step < W):   lr · (step + 1) / W
        constant:            lr
        linear:              min_lr + (lr − min_lr) · (1 − p)
        cosine:              min_lr + (lr − min_lr) · ½ (1 + cos π p)
        with p = min(1, (step − W) / max(1, decay_steps − W))
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    if style == "linear":
        return min_lr + (lr - min_lr) * (1 - progress)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_decay_style {style!r}")
