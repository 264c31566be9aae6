"""What Slurm tells one task of a job about its allocation (one task per node), or the same facts for a run
on this machine alone."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from hpc.slurm import expand_hostlist, queue


@dataclass(frozen=True)
class Allocation:
    job_id: str
    """Slurm's job id ("12345"; array jobs "12345_7"); outside Slurm submitit's local job id, else "local-<pid>"."""
    node_rank: int
    hosts: tuple[str, ...]
    """Slurm node names of the allocation, in Slurm's order: rank k runs on hosts[k]."""
    cpus: int
    """CPUs this task may use on its node."""
    gpus: int
    memory_bytes: int
    """Memory this task may use on its node: the job's --mem, else the node's."""
    restart_count: int = 0

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def host(self) -> str:
        return self.hosts[self.node_rank]

    @property
    def job_number(self) -> int:
        """A number identifying the job on its nodes (for port blocks)."""
        return int(re.sub(r"\D", "", self.job_id) or 0)


def current(environ: Mapping[str, str] = os.environ) -> Allocation:
    """The allocation of this process: from Slurm's variables inside a job step, else this machine alone."""
    if "SLURM_JOB_ID" not in environ or "SLURM_NODEID" not in environ:
        job = environ.get("SUBMITIT_LOCAL_JOB_ID") or f"local-{os.getpid()}"
        return Allocation(job, 0, (os.uname().nodename,), len(os.sched_getaffinity(0)), _visible_gpus(environ),
                          _physical_memory())
    job = environ["SLURM_JOB_ID"]
    if environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{environ.get('SLURM_ARRAY_JOB_ID', job)}_{environ['SLURM_ARRAY_TASK_ID']}"
    return Allocation(
        job_id=job,
        node_rank=int(environ["SLURM_NODEID"]),
        hosts=tuple(expand_hostlist(environ["SLURM_JOB_NODELIST"])),
        cpus=int(environ.get("SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0))),
        gpus=_visible_gpus(environ),
        memory_bytes=int(environ["SLURM_MEM_PER_NODE"]) * 2**20 if environ.get("SLURM_MEM_PER_NODE")
        else _physical_memory(),
        restart_count=int(environ.get("SLURM_RESTART_COUNT") or 0),
    )


def end_time(job_id: str, environ: Mapping[str, str] = os.environ) -> float | None:
    """When Slurm will end this attempt of the job (epoch seconds): `SLURM_JOB_END_TIME` where Slurm sets it
    (23.02 on), else its start and time limit as squeue reports them (a requeued job's count from its new
    start). None outside Slurm, without a time limit, or when squeue does not answer."""
    with contextlib.suppress(KeyError, ValueError):
        return float(environ["SLURM_JOB_END_TIME"])
    if "SLURM_JOB_ID" not in environ:
        return None
    try:
        jobs = queue([job_id])
    except OSError:
        return None
    return next((j.start_time + j.time_limit_s for j in jobs
                 if j.job_id == job_id and j.start_time is not None and j.time_limit_s is not None), None)


def _visible_gpus(environ: Mapping[str, str]) -> int:
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return int(re.sub(r"^.*:", "", environ.get("SLURM_GPUS_ON_NODE", "0")) or 0)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
