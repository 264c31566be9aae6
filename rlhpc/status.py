"""`rlhpc status`: Slurm's view of each run's current job joined with the run's own progress.

Slurm forgets finished jobs (`MinJobAge`, 300 s by default) and many sites have no accounting, so every field
that Slurm cannot give is read from the run folder: the attempt folders count requeues, `result.json` marks a
completed run, `metrics.jsonl` gives rollout, reward and pace, the checkpoint folder the last checkpoint.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpc.slurm import JobInfo, accounting, queue
from rl import checkpoint
from rl.metrics import read_jsonl
from rlhpc.run_folder import FAILED, FROZEN, INTERRUPTED, RESULT, START, excluded_nodes, jobs_dir, submissions


@dataclass
class RunStatus:
    run: str
    run_dir: str
    job_id: str | None
    executor: str | None
    state: str
    reason: str
    nodes: int | None
    elapsed_s: float | None
    time_left_s: float | None
    requeues: int
    interruptions: list[str]
    """Each interruption, oldest first: "USR2 at rollout 3, 0 redone"."""
    excluded: dict[str, str]
    """The nodes the run leaves behind, each with why: {"node2": "node node2 lost (ActorDiedError)"}."""
    rollout: int
    num_rollout: int | None
    last_reward: float | None
    checkpoint: str | None
    checkpoint_age_s: float | None
    eta_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoSuchRun(LookupError):
    """No run folder answers to the name, path or job id given."""


def find_runs(target: str | None, root: Path = Path("runs")) -> list[Path]:
    """Run folders: `target` as a folder, a run name under `root`, or a job id recorded by a run; all of
    `root` when no target."""
    candidates = sorted(p for p in root.glob("*") if (p / FROZEN).exists()) if root.is_dir() else []
    if target is None:
        return candidates
    for path in (Path(target), root / target):
        if (path / FROZEN).exists():
            return [path]
    by_job = [p for p in candidates if any(s["job_id"] == target for s in submissions(p))]
    if by_job:
        return by_job
    raise NoSuchRun(f"{target}: no run folder by that name or path, and no run in {root}/ submitted that job")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest sealed checkpoint (its contents are checked when it is loaded, not here)."""
    try:
        save = tomllib.loads((run_dir / FROZEN).read_text()).get("ckpt", {}).get("save")
    except (OSError, tomllib.TOMLDecodeError):
        save = None
    return checkpoint.sealed_latest(Path(save) if save else run_dir / "checkpoints")


def _attempts(run_dir: Path, job_id: str) -> list[Path]:
    """The job's attempt folders in order; anything else named attempt-* is not one of them."""
    found = [p for p in (jobs_dir(run_dir) / job_id).glob("attempt-*") if p.name[8:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[8:]))


def _interruptions(run_dir: Path, subs: list[dict[str, Any]]) -> list[str]:
    """Why each attempt after the run's first one started, and what it redid: "USR2 at rollout 3, 0 redone"."""
    attempts = [a for sub in subs for a in _attempts(run_dir, sub["job_id"])]
    found = []
    for before, after in zip(attempts, attempts[1:]):
        why = _read(before / INTERRUPTED)
        if why is None:
            text = "ended without a signal (scontrol requeue, a node failure or a resubmission)"
        elif why.get("stopped_at") is not None:
            text = f"{why.get('signal') or why.get('reason', 'stopped')} at rollout {why['stopped_at']}"
        elif why.get("signal"):
            text = f"{why['signal']}: {why.get('reason', 'no checkpoint')}"
        else:
            text = why.get("reason", "stopped")
        if (start := _read(after / START)) is not None and "redone" in start:
            text += f", {start['redone']} redone"
        found.append(text)
    return found


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON object the job wrote; None when missing or damaged (status shows what it can without it)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _state_from_folder(run_dir: Path, job_id: str) -> str:
    """The end state of a job Slurm no longer knows, from what its last attempt wrote: rank 0's summary or the
    error that ended it (JSON: submitit's result pickle is not read, since unpickling a file from a folder
    others may write to runs their code)."""
    attempts = _attempts(run_dir, job_id)
    if not attempts:
        return "UNKNOWN"
    if (attempts[-1] / RESULT).exists():
        return "COMPLETED"
    return "FAILED" if (attempts[-1] / FAILED).exists() else "ENDED"


def run_status(run_dir: Path, slurm: dict[str, JobInfo], now: float | None = None) -> RunStatus:
    now = now or time.time()
    subs = submissions(run_dir)
    last = subs[-1] if subs else None
    job_id = last["job_id"] if last else None
    info = slurm.get(job_id) if job_id else None
    rows = _metrics(run_dir)
    done = len(rows)
    total = rows[-1].get("num_rollout") if rows else None
    ckpt = _latest_checkpoint(run_dir)
    pace = None
    stamped = [r["timestamp"] for r in rows if "timestamp" in r]
    if len(stamped) >= 2:
        pace = (stamped[-1] - stamped[0]) / (len(stamped) - 1)
    nodes: int | None
    if info is not None:
        state, reason, nodes = info.state, info.reason, info.nodes
        elapsed, left = info.elapsed_s(now), info.time_left_s(now)
    else:
        state = _state_from_folder(run_dir, job_id) if job_id else ("COMPLETED" if total and done >= total else "-")
        reason, nodes, elapsed, left = "", last["nodes"] if last else None, None, None
    attempts = _attempts(run_dir, job_id) if job_id else []
    requeues = max(info.restarts if info else 0, len(attempts) - 1, 0) + max(len(subs) - 1, 0)
    interruptions = _interruptions(run_dir, subs)
    running = state in {"RUNNING", "PENDING", "CONFIGURING", "REQUEUED"}
    return RunStatus(
        run=run_dir.name, run_dir=str(run_dir), job_id=job_id, executor=last["executor"] if last else None,
        state=state, reason=reason, nodes=nodes, elapsed_s=elapsed, time_left_s=left, requeues=requeues,
        interruptions=interruptions, excluded={e["node"]: str(e.get("reason", "")) for e in excluded_nodes(run_dir)},
        rollout=done, num_rollout=total, last_reward=rows[-1].get("reward_mean") if rows else None,
        checkpoint=ckpt.name if ckpt else None,
        checkpoint_age_s=now - ckpt.stat().st_mtime if ckpt else None,
        eta_s=pace * (total - done) if pace is not None and total and running else None,
    )


def collect(runs: list[Path], env: dict[str, str] | None = None) -> list[RunStatus]:
    """Status of each run, with one squeue call for all (and one sacct call for what squeue lacks)."""
    wanted = [s[-1]["job_id"] for p in runs if (s := submissions(p)) and s[-1]["executor"] == "slurm"]
    slurm: dict[str, JobInfo] = {}
    if wanted:
        try:
            slurm = {j.job_id: j for j in queue(wanted, env=env)}
        except OSError:  # no squeue here, or no controller answering
            slurm = {}
        missing = [j for j in wanted if j not in slurm]
        if missing:
            slurm |= {j.job_id: j for j in (accounting(missing, env=env) or [])}
    return [run_status(p, slurm) for p in runs]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}" if d or h else f"{m:d}:{s:02d}"
