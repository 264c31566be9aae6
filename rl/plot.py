"""A PNG of a run's curves: reward, response length and KL over rollouts."""

from __future__ import annotations

from pathlib import Path

from rl.metrics import read_jsonl


def plot_run(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics) if "rollout_id" in r]
    if not rows:  # a run that has not finished a rollout, or no run at all
        raise ValueError(f"{metrics}: no rollouts yet")
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
