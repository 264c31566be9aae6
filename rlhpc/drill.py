"""`rlhpc drill`: rehearse an interruption on a live run through Slurm itself, so that a user can prove on
their own site, before a long run, that requeue and resume work there.

    preempt   a short job in a higher-priority partition on the run's nodes: Slurm preempts the run (its
              signal, GraceTime, then a requeue by Slurm)
    timeout   the signal Slurm sends `signal_grace_s` before the time limit, sent now
    requeue   `scontrol requeue`: the job is killed at once, with no signal (as a node failure would)
    node-loss the job's Ray on its last node killed (`srun --overlap` into the allocation): the node is lost
              to the run, which must notice and requeue itself

`--at PHASE` waits until the driver is in that phase (`progress.json`) before acting.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hpc.slurm import (TERMINAL, JobInfo, expand_hostlist, queue, release, requeue, run_on_node, sbatch,
                       show_partitions, signal_batch_shell)
from rl import heartbeat
from rlhpc.run_folder import START, attempt_dir, submissions

KINDS = ("preempt", "timeout", "requeue", "node-loss")
PHASE_POLL_S = 0.02
NODE_COMMAND_TIMEOUT_S = 60
"""How long the node-loss drill's `srun` may take: more than a query, since it starts a step on the node."""


class DrillError(RuntimeError):
    pass


@dataclass(frozen=True)
class Drill:
    job_id: str
    attempt: int
    """The job's restart count when it was interrupted."""
    kind: str
    phase: dict | None
    """The driver's progress when the interruption was set off."""
    action: str


def _queued(job_id: str, env: dict[str, str] | None) -> JobInfo | None:
    """The job as the queue shows it; None once it has left the queue."""
    jobs = queue([job_id], env=env)
    if not jobs:
        return None
    [info] = jobs
    return info


def running_job(run_dir: Path, wait_s: float, env: dict[str, str] | None = None) -> JobInfo:
    """The run's job once it runs (it may still be pending, or waiting out a requeue)."""
    subs = submissions(run_dir)
    if not subs or subs[-1]["executor"] != "slurm":
        raise DrillError(f"{run_dir.name}: no Slurm job (drills need one; submit with `rlhpc submit`)")
    job_id = subs[-1]["job_id"]
    deadline = time.monotonic() + wait_s
    while True:
        info = _queued(job_id, env)
        if info is not None and info.state == "RUNNING":
            return info
        if info is None or info.state != "PENDING" or time.monotonic() > deadline:
            raise DrillError(f"job {job_id} of run {run_dir.name} is {info.state if info else 'not in the queue'}; "
                             "a drill needs it RUNNING")
        time.sleep(0.5)


def wait_for_phase(run_dir: Path, phase: str, since: float, timeout_s: float, rollout: int | None = None) -> dict:
    """The driver's progress once it is in `phase` (of `rollout`, when given), as written after `since` (epoch
    seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beat = heartbeat.read(run_dir)
        if beat is not None and beat["time"] >= since:
            if beat["phase"] == phase and rollout in (None, beat["rollout_id"]):
                return beat
            if beat["phase"] in ("done", "stopped"):
                raise DrillError(f"the run ended ({beat['phase']}) before it was seen in phase {phase!r}")
        time.sleep(PHASE_POLL_S)
    raise DrillError(f"the run did not reach phase {phase!r} within {timeout_s:.0f}s")


def preempting_partition(job: JobInfo, env: dict[str, str] | None = None) -> str:
    """The partition with the highest PriorityTier above the job's own."""
    out = show_partitions(env)
    if out.returncode != 0:
        raise DrillError(f"scontrol show partition failed: {out.stderr.strip()}")
    tiers = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        tiers[fields["PartitionName"]] = int(fields.get("PriorityTier", 1))
    mine = tiers.get(job.partition, 1)
    above = sorted((tier, name) for name, tier in tiers.items() if tier > mine)
    if not above:
        raise DrillError(f"no partition has a higher PriorityTier than {job.partition} ({mine}): nothing can "
                         "preempt this run here; name one with --partition")
    return above[-1][1]


def preempt(job: JobInfo, partition: str, env: dict[str, str] | None = None) -> str:
    p = sbatch("--parsable", f"--partition={partition}", f"--nodelist={job.nodelist}", f"--nodes={job.nodes}",
               "--exclusive", "--job-name=rlhpc-drill", "--output=/dev/null", "--time=5", "--wrap=sleep 5", env=env)
    if p.returncode != 0:
        raise DrillError(f"submitting the preempting job to {partition} failed: {p.stderr.strip()}")
    return f"job {p.stdout.strip().split(';')[0]} in partition {partition} preempts it"


def time_limit_signal(job: JobInfo, signal: str, env: dict[str, str] | None = None) -> str:
    """What Slurm does `signal_grace_s` before the time limit: the signal to the batch shell. The limit itself
    is left alone: a user may shorten it but not lengthen it again, so every later attempt would be cut too."""
    p = signal_batch_shell(job.job_id, signal, env)
    if p.returncode != 0:
        raise DrillError(f"scancel --batch --signal={signal} failed: {p.stderr.strip()}")
    return f"SIG{signal} sent to the batch shell, as before the time limit"


def raylet_pattern(temp_dir: str) -> str:
    """`pkill -f`'s pattern for the raylet of the Ray whose temp dir is `temp_dir`, and no other: the folder is
    matched literally (a '.' in it must not stand for any character); `[r]` keeps pkill from matching srun's
    own command line, which holds the pattern."""
    return f"[r]aylet.*{re.escape(temp_dir)}/"


def kill_ray_on(job: JobInfo, run_dir: Path, env: dict[str, str] | None = None) -> str:
    """Kill the job's Ray processes on its last node (found by their temp dir, so no other job's are touched)."""
    hosts = expand_hostlist(job.nodelist)
    if len(hosts) < 2:
        raise DrillError("a node-loss drill needs a run on 2 nodes or more (the driver's node must stay)")
    host = hosts[-1]
    node = attempt_dir(run_dir, job.job_id, job.restarts) / "nodes" / f"{host}.json"
    try:
        temp_dir = json.loads(node.read_text())["temp_dir"]
    except (OSError, ValueError, KeyError):
        raise DrillError(f"{node} does not say where Ray runs on {host} yet; try again once the run trains") from None
    p = run_on_node(job.job_id, host, "pkill", "-KILL", "-f", raylet_pattern(temp_dir), env=env,
                    timeout_s=NODE_COMMAND_TIMEOUT_S)
    if p.returncode != 0:
        raise DrillError(f"killing Ray on {host} failed: {(p.stderr or p.stdout).strip() or p.returncode}")
    return f"Ray killed on {host}"


def drill(run_dir: Path, kind: str, *, signal: str, at: str | None = None, partition: str | None = None,
          phase_timeout_s: float = 600, env: dict[str, str] | None = None) -> Drill:
    if kind not in KINDS:
        raise DrillError(f"{kind}: not a drill ({', '.join(KINDS)})")
    job = running_job(run_dir, phase_timeout_s, env)
    if kind == "preempt":
        partition = partition or preempting_partition(job, env)
    beat = wait_for_phase(run_dir, at, job.start_time or 0, phase_timeout_s) if at else heartbeat.read(run_dir)
    if kind == "requeue":
        requeue(job.job_id, env)
        action = "requeued at once (no signal)"
    elif kind == "timeout":
        action = time_limit_signal(job, signal, env)
    elif kind == "preempt":
        assert partition is not None  # chosen before the wait
        action = preempt(job, partition, env)
    else:
        action = kill_ray_on(job, run_dir, env)
    return Drill(job.job_id, job.restarts, kind, beat, action)


def wait_resumed(run_dir: Path, job_id: str, after_attempt: int, timeout_s: float,
                 env: dict[str, str] | None = None) -> dict:
    """Wait for the job's next attempt to resume; return its start record. The requeued job waits out Slurm's
    requeue delay (BeginTime) unless released, which this does."""
    start = attempt_dir(run_dir, job_id, after_attempt + 1) / START
    deadline = time.monotonic() + timeout_s
    released = False
    while time.monotonic() < deadline:
        if start.exists():
            return json.loads(start.read_text())
        info = _queued(job_id, env)
        if info is None or (info.state in TERMINAL and info.restarts == after_attempt):
            raise DrillError(f"job {job_id} ended ({info.state if info else 'gone from the queue'}) without a "
                             "requeue: the run finished before the interruption reached it")
        if not released and info is not None and info.state == "PENDING" and info.restarts > after_attempt:
            release(job_id, env)
            released = True
        time.sleep(0.5)
    raise DrillError(f"job {job_id} did not resume within {timeout_s:.0f}s")

