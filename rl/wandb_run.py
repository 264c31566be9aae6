"""One Weights & Biases run per rlhpc run (slime's `--use-wandb`), however often the run is requeued or resumed.

slime starts a new W&B run at each launch (`wandb.init` without an id, a fresh random suffix in its name), so a
requeued slime job shows up as several runs. Here the W&B run's id is drawn once and kept in the run folder
(`wandb-run.json`); every attempt resumes that run (`resume="allow"`), in offline mode too, where each attempt
writes its own `offline-run-*-<id>` folder and `wandb sync` uploads them into the one run. The W&B step is the
rollout id, and the metrics are `metrics.jsonl`'s row (`rl.metrics.curves`: `rollout/<key>`, `eval/<set>/...`).

W&B is imported only when a run uses it. Its API key (`run.wandb_key`) reaches W&B in memory
(`wandb.Settings(api_key=...)`) and is kept for later attempts in the run folder's private `wandb-key` only:
never in config.toml, the batch script or a log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rl.config import RLConfig

STATE = "wandb-run.json"
"""In the run folder: the W&B run's id and the last rollout id given to it."""
KEY = "wandb-key"
"""In the run folder, readable by its owner only: run.wandb_key, for the attempts whose config has none."""


class WandbRun:
    def __init__(self, cfg: RLConfig, run_dir: Path):
        """Start the run's W&B run, or resume it.

        Rollouts already logged are skipped by `log`: a run resumed from a checkpoint older than its last rows
        redoes those rollouts, and W&B can neither delete a step nor take one below its last. Rewinding instead
        (`wandb.init(resume_from="<id>?_step=N")`) is done by W&B's server, which an offline run does not reach.
        A redone rollout draws the same samples (seeded per run, rollout and sample), so the values first logged
        stand for it, its timings aside; where sampling is not reproducible (partial rollouts, async training
        ahead, SGLang without deterministic inference) W&B keeps the first attempt's values and metrics.jsonl
        the redone ones."""
        import wandb

        r, self.run_dir = cfg.run, Path(run_dir)
        self.state = _read_json(self.run_dir / STATE) or {"id": secrets.token_hex(4), "logged_through": -1}
        group = r.wandb_group or self.run_dir.name
        if not r.disable_wandb_random_suffix:
            group = f"{group}_{self.state['id']}"  # slime's random suffix, drawn once: every attempt has the name
        directory = Path(r.wandb_dir or self.run_dir)
        directory.mkdir(parents=True, exist_ok=True)  # W&B's service fails on a folder that is not there
        settings: dict[str, Any] = {"mode": r.wandb_mode} if r.wandb_mode else {}
        if r.wandb_host:
            settings["base_url"] = r.wandb_host
        if (key := api_key(cfg, self.run_dir)) is not None:
            settings["api_key"] = key
        # Slurm sends the job's stop signal (USR2, or USR1) to every process of the step: W&B's system monitor
        # would die of it. Its processes start now, and inherit a mask that blocks both; this process gets a
        # signal that came meanwhile as soon as they are unblocked.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
        try:
            self.run = wandb.init(id=self.state["id"], resume="allow", project=r.wandb_project,
                                  entity=r.wandb_team, group=group, name=group, dir=str(directory),
                                  config=cfg.model_dump(mode="json"), settings=wandb.Settings(**settings))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._save_state()  # before any row: an attempt killed now still leaves the id for the next one

    def log(self, rollout_id: int, metrics: dict[str, float]) -> None:
        """Give W&B one rollout's metrics at step `rollout_id`, unless an earlier attempt already did."""
        if rollout_id <= self.state["logged_through"]:
            return
        self.run.log(metrics, step=rollout_id)
        self.state["logged_through"] = rollout_id
        self._save_state()

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # finish() leaves the writing of the run's files to W&B's service: wait for it

    def _save_state(self) -> None:
        path = self.run_dir / STATE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.state) + "\n")
        os.replace(partial, path)  # a kill mid-write leaves the previous state whole


def api_key(cfg: RLConfig, run_dir: Path) -> str | None:
    """The key this attempt gives W&B: run.wandb_key, else the one an earlier attempt kept (`keep_key`); None
    where neither has one, so that W&B looks for WANDB_API_KEY and ~/.netrc itself, and for offline and
    disabled runs, which need none."""
    if cfg.run.wandb_mode in ("offline", "disabled"):
        return None
    keep_key(cfg, run_dir)
    path = Path(run_dir) / KEY
    return path.read_text().strip() if path.exists() else None


def keep_key(cfg: RLConfig, run_dir: Path) -> None:
    """Keep run.wandb_key in the run folder's `wandb-key`, readable by its owner only, for the attempts that read
    the frozen config, which leaves the key out (a requeued job, `rlhpc resume`)."""
    if cfg.run.wandb_key is None or cfg.run.wandb_mode in ("offline", "disabled"):
        return
    fd = os.open(Path(run_dir) / KEY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(cfg.run.wandb_key.get_secret_value() + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
