"""Where a run's numbers go: `metrics.jsonl` (one object per rollout), TensorBoard, W&B, and the terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rl.config import RLConfig

NOT_CURVES = {"rollout_id", "num_rollout", "timestamp"}
"""Row fields that place a row (for `rlhpc status`) rather than measure training."""
log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file written a line at a time; [] when there is no file. A line that is not one
    (a write cut short by a kill or a full disk) is skipped with a warning naming it, so that one bad line
    does not stop `status` or a resume."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s:%d: skipped a line that is not a JSON object (a write cut short?)", path, n)
    return rows


def curves(row: dict[str, Any]) -> dict[str, float]:
    """A row's numbers as TensorBoard and W&B plot them: training's under `rollout/`, evaluation's keeping their
    own prefix (`eval/<set>/...`, `eval_before_train/<set>/...`)."""
    return {key if "/" in key else f"rollout/{key}": value for key, value in row.items()
            if key not in NOT_CURVES and isinstance(value, (int, float))}


def rollout_row(rollout_id: int, samples: Sequence[Any], oldest_version: int, train_metrics: dict[str, float],
                extra: dict[str, Any]) -> dict[str, Any]:
    """A rollout's row of metrics.jsonl: its samples' rewards, response lengths and truncation, the age of the
    weights that generated them (`staleness`: rollouts since the oldest weights used), training's metrics (`kl`
    first, 0 when none is computed), then `extra` (timings, counters, evaluation, where the run stands)."""
    import torch

    rewards = torch.tensor([s.reward for s in samples])
    return {
        "rollout_id": rollout_id,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "response_len_mean": sum(s.response_length for s in samples) / len(samples),
        "truncated_frac": sum(s.status == "truncated" for s in samples) / len(samples),
        "weight_version": oldest_version,
        "staleness": rollout_id - oldest_version,
        "kl": train_metrics.get("kl", 0.0),
        **{k: v for k, v in train_metrics.items() if k != "kl"},
        **extra,
    }


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_from: int = 0, wandb: RLConfig | None = None):
        """Rows of rollouts at or after `resume_from` are dropped: a resumed run writes them again. With `wandb`
        (the run's config, when run.use_wandb) each row goes to the run's W&B run too (`rl.wandb_run`)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        kept = [row for row in rows if row.get("rollout_id", -1) < resume_from]
        self.dropped = len(rows) - len(kept)  # rollouts done after the checkpoint resumed from: redone
        if rows and not kept:
            # A start from scratch over earlier rows (none checkpointed, or --force): they are kept aside, not
            # emptied.
            kept_as = self.path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(self.path, kept_as)
            log.warning("starting from rollout %d: the %d rows already in %s are kept in %s", resume_from,
                        len(rows), self.path, kept_as)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_from)
        self.wandb = None
        if wandb is not None and wandb.run.wandb_mode != "disabled":
            from rl.wandb_run import WandbRun

            self.wandb = WandbRun(wandb, run_dir)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for key, value in curves(row).items():
                self.tb.add_scalar(key, value, row["rollout_id"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row["rollout_id"], curves(row))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class Progress:
    """A rich progress bar with ETA on a terminal; one plain line per rollout otherwise (logs, Slurm)."""

    def __init__(self, total: int, start: int):
        self.total = total
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[status]}"))
            self.task = self.bar.add_task("", total=total, completed=start, status="")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        done = row["rollout_id"] + 1
        status = f"reward {row['reward_mean']:.3f}  len {row['response_len_mean']:.1f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, status=status)
        else:
            print(f"rollout {done}/{self.total}  {status}  {row['samples_per_s']:.1f} samples/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
