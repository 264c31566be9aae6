"""The run folder (`runs/<name>/`), the one place a run's state lives, read back by `status`, `logs`,
`cancel` and `resume` even when Slurm has forgotten the jobs:

    config.toml          the resolved config, frozen when the run was started or submitted
    fingerprint          sha256 of its learning sections: the run's identity, and the mark that rlhpc made
                         the folder (a different config aimed at it is refused)
    submissions.jsonl    one line per submitted job: job id, executor, nodes, time
    jobs/<job id>/       submitit's pickles (never read by `status`: anyone who can write them could plant code)
                         and each task's append-mode log (<job id>_<task>_log.out/err)
    jobs/<job id>/attempt-<k>/   one folder per requeue: Ray rendezvous files and Ray's logs, and
        start.json        the checkpoint this attempt resumed from and the rollouts it redid
        interrupted.json  why it stopped early (signal, rollout stopped at or reason) and whether it requeued
        result.json       rank 0's summary when the loop returned
        failed.json       the error that ended rank 0's job otherwise
    cancelled            present once `rlhpc cancel` stopped the run: nothing requeues or resumes it
    excluded_nodes.jsonl the nodes the run leaves behind (`slurm.max_excluded_nodes`), one line each: node,
                         why, job, attempt, time; each requeue and each later submission excludes them
    metrics.jsonl, checkpoints/  written by the loop
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc.processes import process_start
from rl.metrics import read_jsonl
from rl.wandb_run import keep_key

if TYPE_CHECKING:
    from rlhpc.config import Config

FROZEN = "config.toml"
FINGERPRINT = "fingerprint"
CLUSTER_SECTIONS = ("slurm", "ray")
SUBMISSIONS = "submissions.jsonl"
CANCELLED = "cancelled"
START = "start.json"
INTERRUPTED = "interrupted.json"
RESULT = "result.json"
FAILED = "failed.json"
EXCLUDED = "excluded_nodes.jsonl"


class RunFolderError(ValueError):
    """A run folder that this config may not take: another run's, or a folder rlhpc did not make."""


def freeze(cfg: Config, *, replace: bool = False) -> Path:
    """Create the run folder and write the resolved config there, the run folder itself made explicit, so
    editing the TOML later never changes a running or requeued job; its fingerprint beside it is the run's
    identity. A folder holding another run is refused unless `replace` (`--force`, or `resume` taking the
    run up with changes), and a folder rlhpc did not make always is: its files are the user's."""
    from rlhpc.config import dump_toml

    run_dir = cfg.run_dir()
    frozen = cfg.model_copy(deep=True)
    frozen.run.output_dir = run_dir
    text = dump_toml(frozen)
    identity = fingerprint(tomllib.loads(text))
    _claim(run_dir, tomllib.loads(text), identity, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # [slurm.env] (tokens, keys) is in the config and the batch scripts under it
    write_private(run_dir / FROZEN, text)
    keep_key(cfg, run_dir)  # the frozen config leaves the W&B key out: the job reads it from here
    (run_dir / FINGERPRINT).write_text(identity + "\n")
    return run_dir


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of a resolved config's learning sections: what makes two configs the same run ([slurm] and [ray]
    say only where and for how long it runs, and change between submissions)."""
    learning = {section: table for section, table in config.items() if section not in CLUSTER_SECTIONS}
    return hashlib.sha256(json.dumps(learning, sort_keys=True).encode()).hexdigest()


def _claim(run_dir: Path, config: dict[str, Any], identity: str, replace: bool) -> None:
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    try:
        recorded = (run_dir / FINGERPRINT).read_text().strip()
    except OSError:
        recorded = None
    try:
        frozen = tomllib.loads((run_dir / FROZEN).read_text())
    except (OSError, ValueError):
        frozen = None
    if recorded is None and frozen is not None and frozen.get("run", {}).get("output_dir") == str(run_dir):
        recorded = fingerprint(frozen)  # a run folder frozen before fingerprints were written
    if recorded is None:
        raise RunFolderError(f"{run_dir} is not a run folder rlhpc made (no {FINGERPRINT}), and its files are "
                             "not rlhpc's to overwrite: set run.output_dir (or run.name) to a new or empty folder")
    if recorded == identity or replace:
        return
    changed = _changed(frozen, config) if frozen else []
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    raise RunFolderError(
        f"{run_dir} holds another run (its frozen config differs{' in ' + shown if shown else ''}): continue that "
        f"one with `rlhpc resume {run_dir}` (--set to change fields), start a new one under another run.name or "
        "run.output_dir, or pass --force to point this config at its folder and checkpoints")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted fields whose values differ between two resolved configs' learning sections."""
    sections = sorted((set(old) | set(new)) - set(CLUSTER_SECTIONS))
    return [f"{s}.{k}" for s in sections for k in sorted(set(old.get(s, {})) | set(new.get(s, {})))
            if old.get(s, {}).get(k) != new.get(s, {}).get(k)]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: it may hold [slurm.env]'s secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def jobs_dir(run_dir: Path) -> Path:
    return run_dir / "jobs"


def attempt_dir(run_dir: Path, job_id: str, restart_count: int) -> Path:
    return jobs_dir(run_dir) / job_id / f"attempt-{restart_count}"


def record_submission(run_dir: Path, job_id: str, executor: str, nodes: int) -> None:
    """Append a job to the run's submissions, once (the job records itself too, for scripts run by sbatch).
    A local job's id is its process id: its start time is recorded with it, so that `cancel` can tell the job
    from a later process that reuses the id."""
    if any(s["job_id"] == job_id for s in submissions(run_dir)):
        return
    entry = {"job_id": job_id, "executor": executor, "nodes": nodes, "submitted_at": time.time()}
    if executor == "local" and job_id.isdigit():
        entry["started"] = process_start(int(job_id))
    with (run_dir / SUBMISSIONS).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def submissions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's jobs, oldest first (lines without a job id are skipped, as damaged ones are)."""
    return [s for s in read_jsonl(run_dir / SUBMISSIONS) if isinstance(s.get("job_id"), str)]


def task_logs(run_dir: Path, job_id: str, task: int) -> list[Path]:
    """submitit's stdout and stderr files of one task (one task per node: task k runs on node k)."""
    folder = jobs_dir(run_dir) / job_id
    return [folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"]


def mark_cancelled(run_dir: Path) -> None:
    (run_dir / CANCELLED).write_text(f"{time.time()}\n")


def is_cancelled(run_dir: Path) -> bool:
    return (run_dir / CANCELLED).exists()


def excluded_nodes(run_dir: Path) -> list[dict[str, Any]]:
    """The nodes the run leaves behind, oldest first, each once (two tasks may both have recorded one)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in read_jsonl(run_dir / EXCLUDED):
        if isinstance(entry.get("node"), str):
            found.setdefault(entry["node"], entry)
    return list(found.values())


def newly_excluded(excluded: list[str], failed: list[str], cap: int) -> list[str]:
    """Of the `failed` nodes, those to leave behind too: the ones not yet `excluded`, while the run excludes
    fewer than `cap` (a run that excluded every node would wait for ever)."""
    new = [n for n in dict.fromkeys(failed) if n not in excluded]
    return new[:max(0, cap - len(excluded))]


def exclude_nodes(run_dir: Path, failed: list[str], reason: str, job_id: str, attempt: int, cap: int) -> list[str]:
    """Record the failed nodes the run leaves behind from now on (see `newly_excluded`); returns every node it
    excludes."""
    excluded = [e["node"] for e in excluded_nodes(run_dir)]
    if new := newly_excluded(excluded, failed, cap):
        with (run_dir / EXCLUDED).open("a") as f:
            f.writelines(json.dumps({"node": node, "reason": reason, "job_id": job_id, "attempt": attempt,
                                     "time": time.time()}) + "\n" for node in new)
    return excluded + new


def leaving_behind(cfg: Config) -> Config:
    """The config with the nodes its run folder leaves behind (`rlhpc.job`) added to sbatch's `exclude`: a new
    submission of the run (`rlhpc resume`, `render`) avoids them as its requeues did, and its frozen config says so."""
    from hpc.slurm import exclusion

    excluded = [e["node"] for e in excluded_nodes(cfg.run_dir())]
    if not excluded:
        return cfg
    options = cfg.slurm.additional_parameters
    left = cfg.model_copy(deep=True)
    left.slurm.additional_parameters = {**options, "exclude": exclusion(options.get("exclude"), excluded)}
    return left
