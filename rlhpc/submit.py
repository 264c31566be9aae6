"""`rlhpc submit`: freeze the run's config in its run folder (`rlhpc.run_folder`) and submit
`rlhpc.job.run_job` through submitit, to Slurm when it is reachable, else through submitit's local executor."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc.config import SlurmConfig
from hpc.slurm import TERMINAL, controller_answers
from hpc.wait import until
from rlhpc.config import Config
from rlhpc.render import batch_script, job_name
from rlhpc.run_folder import freeze, jobs_dir, leaving_behind, record_submission

if TYPE_CHECKING:
    import submitit




@dataclass(frozen=True)
class Submitted:
    run_dir: Path
    job_id: str
    executor: str
    """"slurm" or "local"."""
    job: Any
    """The submitit Job, for waiting on it."""


def slurm_reachable() -> bool:
    """Whether sbatch exists and a controller answers (`sinfo` within 10 s)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    return controller_answers(timeout_s=10)


def slurm_executor(s: SlurmConfig, run_dir: Path, name: str) -> submitit.SlurmExecutor:
    """submitit's Slurm executor submitting the run's own batch script (`rlhpc.render`), whose shell handles
    the stop signal, instead of submitit's, which runs srun in the foreground."""
    import submitit

    class RunExecutor(submitit.SlurmExecutor):
        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return batch_script(s, run_dir, name, command, env={"SUBMITIT_EXECUTOR": "slurm"},
                                header=f"Submitted by `rlhpc submit` for run {run_dir.name}.")

    ex = RunExecutor(folder=jobs_dir(run_dir) / "%j", max_num_timeout=s.max_requeues)
    ex.update_parameters(nodes=s.nodes, ntasks_per_node=1)  # how submitit counts the job's tasks
    return ex


def sbatch_script(cfg: Config, run_dir: Path) -> str:
    """The sbatch script `submit` would send, for --dry-run (nothing is written or submitted)."""
    ex = slurm_executor(leaving_behind(cfg).slurm, run_dir, job_name(cfg))
    return ex._make_submission_file_text(ex._submitit_command_str, "")


def submit(cfg: Config, *, local: bool = False, replace: bool = False) -> Submitted:
    """Freeze (`replace`: see `freeze`) and submit, off the nodes the run leaves behind; `local` (or no
    reachable Slurm) runs through submitit's local executor."""
    import submitit

    from rlhpc.job import run_job

    cfg = leaving_behind(cfg)
    run_dir = freeze(cfg, replace=replace)
    if local:
        ex: Any = submitit.LocalExecutor(folder=jobs_dir(run_dir) / "%j")
        ex.update_parameters(timeout_min=cfg.slurm.time_minutes or 60 * 24 * 365, nodes=1, tasks_per_node=1)
        executor = "local"
    else:
        ex = slurm_executor(cfg.slurm, run_dir, job_name(cfg))
        executor = "slurm"
    job = ex.submit(run_job, str(run_dir))
    record_submission(run_dir, str(job.job_id), executor, cfg.slurm.nodes)
    return Submitted(run_dir, str(job.job_id), executor, job)


class JobFailed(RuntimeError):
    pass


def wait(done: Submitted, poll_s: float = 1.0) -> dict[str, Any]:
    """Block until the job ends and return rank 0's result. Slurm jobs are followed in squeue, not through
    submitit's `wait`, which relies on sacct and never ends where accounting is off."""
    import submitit

    from hpc.slurm import queue

    job = done.job
    if done.executor == "slurm":
        until(lambda: all(j.state in TERMINAL for j in queue([done.job_id])), float("inf"), poll_s)
        # the result file may reach a shared filesystem a little after the job has left squeue
        if not until(job.paths.result_pickle.exists, 30, poll_s):
            raise JobFailed(f"job {done.job_id} ended without a result; see {job.paths.stderr}")
    try:
        return job.results()[0]
    except submitit.core.utils.UncompletedJobError as e:
        raise JobFailed(f"job {done.job_id} failed; see {job.paths.stderr}\n{e}") from None
