"""A PNG of a run's curves: reward, response length and KL over rollouts."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics} has no rollouts yet")
    x = [r["rollout_id"] for r in rows]
    panels = [("reward_mean", "reward"), ("response_len_mean", "response length (tokens)"), ("kl", "KL to reference")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 8), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        ax.plot(x, [r.get(key, float("nan")) for r in rows])
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("rollout")
    fig.suptitle(Path(metrics).parent.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
