"""What every task of a run's job executes (one task per node), under Slurm or submitit's local executor:
bring this node into the job's Ray cluster, run the GRPO driver on rank 0, take Ray down.

This is where `hpc` (the allocation, Ray) meets `rl` (the loop); neither package knows the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hpc import allocation
from hpc.ray_cluster import ray_cluster
from hpc.slurm import requeue as requeue_job
from rlhpc.run_folder import attempt_dir, is_cancelled, jobs_dir, record_submission


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_job(run_dir: str) -> dict[str, Any] | None:
    """Entry of every task. Rank 0 returns the run's summary; the other ranks return None."""
    from rl.loop import run as run_loop
    from rlhpc.config import load_config

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = Path(run_dir)
    cfg = load_config(folder / "config.toml")
    alloc = allocation.current()
    attempt = attempt_dir(folder, alloc.job_id, alloc.restart_count)
    in_slurm = "SLURM_JOB_ID" in os.environ
    if alloc.node_rank == 0:
        record_submission(folder, alloc.job_id, "slurm" if in_slurm else "local", alloc.num_nodes)
    if not in_slurm:
        with contextlib.suppress(OSError):  # submitit's local executor creates its folder pattern literally
            (jobs_dir(folder) / "%j").rmdir()
    logging.getLogger("rlhpc.job").info("job %s, node %s (rank %d of %d), attempt %s", alloc.job_id, alloc.host,
                                        alloc.node_rank, alloc.num_nodes, attempt)
    # scancel, a node failure or the end of the step sends SIGTERM before SIGKILL (submitit ignores it):
    # unwind, so that Ray is stopped on this node instead of outliving the job.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # The signal Slurm sends before the time limit or on preemption (`[slurm] signal`): rank 0's loop
    # checkpoints at the next boundary between rollouts, then the job requeues itself once Ray is down.
    # It replaces submitit's handler, which would requeue at once, without a checkpoint.
    stop = threading.Event()
    stop_signal = getattr(signal, f"SIG{cfg.slurm.signal}")
    signal.signal(stop_signal, (lambda signum, frame: stop.set()) if alloc.node_rank == 0 else signal.SIG_IGN)
    with ray_cluster(alloc, attempt, cfg.ray, cfg.slurm.env, ignore_signals=(stop_signal,)) as cluster:
        if cluster is None:
            return None
        (attempt / "cluster.json").write_text(json.dumps({"address": cluster.address, "nodes": cluster.nodes}))
        result = run_loop(cfg, folder, ray_address=cluster.address, should_stop=stop.is_set)
        rows = result["rows"]
        summary = {"run_dir": str(folder), "job_id": alloc.job_id, "rollouts": len(rows),
                   "last_reward": rows[-1]["reward_mean"] if rows else None, "ray_nodes": cluster.nodes,
                   "workers": result["workers"], "stopped_at": result["stopped_at"]}
        (attempt / "result.json").write_text(json.dumps(summary))
    if result["stopped_at"] is not None:
        requeue = in_slurm and not is_cancelled(folder) and alloc.restart_count < cfg.slurm.max_requeues
        (attempt / "interrupted.json").write_text(json.dumps(
            {"signal": cfg.slurm.signal, "stopped_at": result["stopped_at"], "time": time.time(),
             "requeued": requeue}))
        if requeue:
            requeue_job(alloc.job_id)  # ends this job now and queues it again: the last thing it does
    return summary


if __name__ == "__main__":  # `python -m rlhpc.job RUN_DIR`: the entry of rendered sbatch scripts
    run_job(sys.argv[1])
