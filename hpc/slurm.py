"""Slurm's view of jobs and the actions on them: `squeue` (JSON, else plain format), `sacct` when accounting
is on, `scancel`, `scontrol requeue` (with the nodes the job must avoid); and every other Slurm client command
rlhpc runs (host lists, nodes, the controller's settings, the drills' `sbatch` and `srun`), each through
`slurm_command`, so that none waits longer than SLURM_TIMEOUT_S for a controller that does not answer.

Sites run every Slurm from 20.11 to 25.x, so the JSON is read across its schema versions: `job_state` is a
string up to data parser v0.0.39 and a list after; numbers are plain before v0.0.39 and `{set, infinite,
number}` objects from it. Without `--json` (before 21.08, or a site that built Slurm without it) the plain
`--format` output is parsed. Nothing here depends on `sacct` being there: without accounting it fails, and a
job that has left `squeue` is then known only from the run folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
"""The states of a job that has ended (and will not run again unless requeued)."""
_FORMAT = "%i|%j|%T|%r|%D|%N|%P|%l|%S|%V"
_FORMAT_FIELDS = ("job_id", "name", "state", "reason", "nodes", "nodelist", "partition", "time_limit", "start",
                  "submit")


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str
    state: str
    """PENDING, RUNNING, COMPLETED, ... (the first of Slurm's flags when it gives several)."""
    reason: str
    nodes: int
    nodelist: str
    partition: str
    time_limit_s: int | None
    """None when unlimited."""
    start_time: float | None
    """Epoch seconds; None before the job starts (or its expected start when pending)."""
    submit_time: float | None
    restarts: int
    exit_code: int | None = None

    def elapsed_s(self, now: float | None = None) -> float | None:
        if self.start_time is None or self.state == "PENDING":
            return None
        return max(0.0, (now or time.time()) - self.start_time)

    def time_left_s(self, now: float | None = None) -> float | None:
        elapsed = self.elapsed_s(now)
        if elapsed is None or self.time_limit_s is None:
            return None
        return max(0.0, self.time_limit_s - elapsed)


def number(value: Any) -> int | float | None:
    """A number of any schema: plain, or `{set, infinite, number}` (None when unset or infinite)."""
    if isinstance(value, dict):
        if value.get("infinite") or not value.get("set", True):
            return None
        value = value.get("number")
    if value is None or isinstance(value, bool):
        return None
    return value


def state_of(value: Any) -> str:
    """`job_state` of any schema: "RUNNING", or ["RUNNING"] / ["PENDING", "REQUEUED"]."""
    if isinstance(value, list):
        return str(value[0]) if value else "UNKNOWN"
    return str(value or "UNKNOWN")


def _epoch(value: Any) -> float | None:
    n = number(value)
    return float(n) if n else None


def _exit_code(value: Any) -> int | None:
    # Up to v0.0.38 the raw wait status (exit code << 8); newer: {"status": [...], "return_code": number}.
    if isinstance(value, dict):
        code = number(value.get("return_code"))
        return None if code is None else int(code)
    raw = number(value)
    return None if raw is None else (int(raw) >> 8) & 0xFF


def jobs_from_json(data: dict[str, Any]) -> list[JobInfo]:
    """Parse `squeue --json` or `sacct --json` output of any schema version."""
    found = []
    for j in data.get("jobs", []):
        if isinstance(j.get("state"), dict):  # sacct: {"current": [...], "reason": ...}
            state, reason = j["state"].get("current"), j["state"].get("reason", "")
        else:
            state, reason = j.get("job_state"), j.get("state_reason", "")
        limit = number(j.get("time_limit"))
        if isinstance(j.get("time"), dict):  # sacct: times nested under "time"
            t = j["time"]
            start, submit = _epoch(t.get("start")), _epoch(t.get("submission"))
            limit = number(t.get("limit"))
        else:
            start, submit = _epoch(j.get("start_time")), _epoch(j.get("submit_time"))
        array_task = number(j.get("array_task_id"))
        job_id = str(number(j.get("job_id")))
        if array_task is not None:
            job_id = f"{number(j.get('array_job_id'))}_{array_task}"
        nodelist = j.get("nodes") if isinstance(j.get("nodes"), str) and j["nodes"] != "None assigned" else ""
        count = number(j.get("node_count"))
        if count is None and isinstance(j.get("allocation_nodes"), (int, dict)):
            count = number(j.get("allocation_nodes"))
        found.append(JobInfo(
            job_id=job_id,
            name=str(j.get("name", "")),
            state=state_of(state),
            reason="" if reason in (None, "None") else str(reason),
            nodes=int(count or 0),
            nodelist=nodelist,
            partition=str(j.get("partition", "")),
            time_limit_s=None if limit is None else int(limit) * 60,
            start_time=start,
            submit_time=submit,
            restarts=int(number(j.get("restart_cnt")) or 0),
            exit_code=_exit_code(j.get("exit_code")),
        ))
    return found


def jobs_from_format(text: str) -> list[JobInfo]:
    """Parse `squeue -h -o` with `_FORMAT` (the fallback where `--json` is missing)."""
    found = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != len(_FORMAT_FIELDS):
            continue
        f = dict(zip(_FORMAT_FIELDS, parts, strict=True))
        found.append(JobInfo(
            job_id=f["job_id"], name=f["name"], state=f["state"], reason=f["reason"] if f["reason"] != "None" else "",
            nodes=int(f["nodes"] or 0), nodelist=f["nodelist"], partition=f["partition"],
            time_limit_s=_limit_seconds(f["time_limit"]), start_time=_timestamp(f["start"]),
            submit_time=_timestamp(f["submit"]), restarts=0))
    return found


def _limit_seconds(value: str) -> int | None:
    if value in {"UNLIMITED", "INVALID", "NOT_SET", ""}:
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def _timestamp(value: str) -> float | None:
    if value in {"N/A", "Unknown", "None", ""}:
        return None
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


SLURM_TIMEOUT_S = 30
"""How long a Slurm command may take: without a reachable configuration one looks for it in DNS, which can take
a minute, and one whose controller does not answer keeps retrying."""


def slurm_command(*args: str, env: dict[str, str] | None = None,
                  timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command, its output captured; OSError when it does not end within `timeout_s`
    (SLURM_TIMEOUT_S unless given)."""
    limit = SLURM_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        raise OSError(f"{' '.join(args[:2])} did not answer within {limit}s") from None


def _squeue(*args: str, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return slurm_command("squeue", *args, env=env)


def queue(job_ids: list[str] | None = None, env: dict[str, str] | None = None) -> list[JobInfo]:
    """Jobs in `squeue` (all of the user's, or `job_ids`): JSON when this Slurm has it, else plain format.
    Finished jobs too, while the controller holds them (`MinJobAge`): squeue leaves them out unless asked,
    even when named by id (Slurm 24.11), and they carry the state and exit code when sacct is off."""
    selector = ["--states=all", *(["--jobs", ",".join(job_ids)] if job_ids else ["--me"])]
    p = _squeue("--json", *selector, env=env)
    if p.returncode == 0 and p.stdout.lstrip().startswith("{"):
        jobs = jobs_from_json(json.loads(p.stdout))  # Slurm 22.05's --json ignores the selection: apply it here
        return [j for j in jobs if j.job_id in job_ids] if job_ids else jobs
    p = _squeue("-h", "-o", _FORMAT, *selector, env=env)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:  # a finished job squeue has already forgotten
            return []
        raise OSError(f"squeue failed: {p.stderr.strip()}")
    return jobs_from_format(p.stdout)


def accounting(job_ids: list[str], env: dict[str, str] | None = None) -> list[JobInfo] | None:
    """Jobs from `sacct --json`; None where accounting is off or sacct lacks --json."""
    try:
        p = slurm_command("sacct", "--json", "-X", "--jobs", ",".join(job_ids), env=env)
    except OSError:
        return None
    if p.returncode != 0 or not p.stdout.lstrip().startswith("{"):
        return None
    return jobs_from_json(json.loads(p.stdout))


def cancel(job_id: str, env: dict[str, str] | None = None) -> None:
    p = slurm_command("scancel", job_id, env=env)
    if p.returncode != 0:
        raise OSError(f"scancel {job_id} failed: {p.stderr.strip()}")


def requeue_commands(job_id: str, exclude: str = "") -> list[list[str]]:
    """The scontrol calls of a requeue that keeps the job off the nodes of `exclude` (a Slurm hostlist; "" for
    none). ExcNodeList can be changed only on a pending job (ESLURM_JOB_NOT_PENDING otherwise), and a requeued
    job is one at once: squeue says COMPLETING while its nodes clean up, but its base state is PENDING, and it
    stays pending for Slurm's requeue delay (BeginTime), so the update follows the requeue. Slurm keeps the
    list for every later requeue of the job; the update replaces it, so `exclude` is the whole list."""
    commands = [["scontrol", "requeue", job_id]]
    if exclude:
        commands.append(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={exclude}"])
    return commands


def requeue(job_id: str, env: dict[str, str] | None = None, exclude: str = "") -> None:
    """Put a job back in the queue (a running one is ended first), off the nodes of `exclude`; it keeps its id
    and counts a restart. Called from inside the job, the requeue ends the caller: Slurm sends SIGTERM to every
    process of the job, the update's scontrol included, within milliseconds. The calling thread holds SIGTERM
    back meanwhile, and the commands it starts inherit that mask, so the update is not cut short (its SIGKILL
    comes KillWait later); the caller's own handler sees the signal in another thread (see rlhpc.job). The
    update is made even when the requeue fails: another task of the job may have requeued it first, and it
    is then pending all the same. OSError names every call that failed."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        done = [(args, slurm_command(*args, env=env)) for args in requeue_commands(job_id, exclude)]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    if failed := [f"{' '.join(args[:2])} {job_id} failed: {p.stderr.strip()}" for args, p in done if p.returncode]:
        raise OSError("; ".join(failed))


def exclusion(configured: str | int | bool | None, nodes: list[str]) -> str:
    """A job's ExcNodeList: what its sbatch options exclude (`configured`, the value of sbatch's `exclude` if
    any: a hostlist, whose ranges are kept as written, "node[1-3],gpu7") and `nodes`, each item once."""
    items = re.split(r",(?![^\[]*\])", str(configured)) if configured is not None else []  # commas outside []
    return ",".join(dict.fromkeys([*items, *nodes]))


def kill_wait_s(env: dict[str, str] | None = None) -> int:
    """The cluster's KillWait: seconds between a step's SIGTERM and its SIGKILL (Slurm's default 30)."""
    try:
        p = show_config(env)
    except OSError:
        return 30
    m = re.search(r"^KillWait\s*=\s*(\d+)", p.stdout, re.MULTILINE)
    return int(m.group(1)) if m else 30


def release(job_id: str, env: dict[str, str] | None = None) -> None:
    """Start a requeued job without Slurm's requeue delay (BeginTime, about 2 minutes). The delay protects the
    new incarnation from the last one's leftovers, so this waits out the worst of them: the last srun, whose
    step lost a node, waits KillWait + 2 s for it and then terminates "its" step, by a job and step id the new
    incarnation has reused; and nodes revoke the old credential in the second the old job ends (a start in that
    second fails with "Job credential revoked"). The update says `now`, since a start time in the future waits
    for the scheduler's next periodic pass."""
    time.sleep(kill_wait_s(env) + 5)
    with contextlib.suppress(OSError):  # without the update the job still starts, after the delay
        slurm_command("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=env)


# --- the cluster's nodes and settings ----------------------------------------------------------------------


def expand_hostlist(hostlist: str, env: dict[str, str] | None = None) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") as names, by `scontrol show hostnames`;
    CalledProcessError when scontrol refuses it."""
    p = slurm_command("scontrol", "show", "hostnames", hostlist, env=env)
    p.check_returncode()
    return p.stdout.split()


def node_addresses(hosts: list[str] | tuple[str, ...], env: dict[str, str] | None = None) -> dict[str, str]:
    """Slurm's NodeAddr of each host: the address its slurmd is reached at (`scontrol show node`);
    CalledProcessError when scontrol refuses them."""
    p = slurm_command("scontrol", "show", "node", "-o", ",".join(hosts), env=env)
    p.check_returncode()
    found = {}
    for line in p.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            found[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    return found


def node_states(env: dict[str, str] | None = None) -> dict[str, str]:
    """Each node's state as `sinfo` gives it ("idle", "down*", ...); empty when the controller refuses."""
    p = slurm_command("sinfo", "-h", "-N", "-o", "%N %T", env=env)
    if p.returncode != 0:
        return {}
    return dict(line.split()[:2] for line in p.stdout.splitlines() if line.strip())


def version(timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """`sinfo -V`: the Slurm of the client commands ("slurm 23.11.4")."""
    return slurm_command("sinfo", "-V", timeout_s=timeout_s)


def controller_answers(timeout_s: float | None = None) -> bool:
    """Whether a controller answers `sinfo` (the partitions) within `timeout_s`."""
    try:
        return slurm_command("sinfo", "-h", "-o", "%P", timeout_s=timeout_s).returncode == 0
    except OSError:
        return False


def show_config(env: dict[str, str] | None = None,
                timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """`scontrol show config`: the controller's settings, one "Key = value" a line."""
    return slurm_command("scontrol", "show", "config", env=env, timeout_s=timeout_s)


def show_partitions(env: dict[str, str] | None = None,
                    timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """`scontrol show partition -o`: a line of Key=Value fields for each partition."""
    return slurm_command("scontrol", "show", "partition", "-o", env=env, timeout_s=timeout_s)


# --- what the drills do to a job ---------------------------------------------------------------------------


def sbatch(*options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Submit a job: `sbatch OPTIONS` (a script among them, or `--wrap`)."""
    return slurm_command("sbatch", *options, env=env)


def signal_batch_shell(job_id: str, signal_name: str,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send a signal to the job's batch shell alone, as Slurm does before the time limit (`scancel --batch`)."""
    return slurm_command("scancel", "--batch", f"--signal={signal_name}", job_id, env=env)


def run_on_node(job_id: str, host: str, *command: str, env: dict[str, str] | None = None,
                timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `command` on one node of a running job, beside its steps (`srun --overlap`)."""
    return slurm_command("srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={host}",
                         *command, env=env, timeout_s=timeout_s)
