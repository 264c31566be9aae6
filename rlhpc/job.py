"""What every task of a run's job executes (one task per node), under Slurm or submitit's local executor:
bring this node into the job's Ray cluster, run the GRPO driver on rank 0, take Ray down.

This is where `hpc` (the allocation, Ray) meets `rl` (the loop); neither package knows the other.

Interruptions: Slurm sends `[slurm] signal` to the batch shell `signal_grace_s` before the time limit and
on preemption; the shell passes it to the tasks (templates/sbatch/). Rank 0's loop stops at its next safe
point, checkpoints if the grace allows, and once Ray is down requeues the job, which resumes from its latest
complete checkpoint. If the tasks do not end in time (a step stuck in a collective), the shell requeues the
job itself with `python -m rlhpc.job --requeue RUN_DIR`.

A failed node is left behind: when an attempt ends for a node gone from the job's Ray cluster (the driver's
error or the watchdog's verdict, on rank 0, names it), rank 0 records the node in the run folder and requeues
the job with the run's excluded nodes as its ExcNodeList, up to `slurm.max_excluded_nodes`; later submissions
(`rlhpc resume`) exclude them too. A task whose own Ray stopped blames no node: a worker's Ray stops as well
when the head's node is lost, which it cannot tell from its own failure. When the lost node is rank 0's (the
batch host), nothing of the job is left to record it: Slurm ends the job as NODE_FAIL once its SlurmdTimeout
has passed and requeues it (`--requeue`), holding the node DOWN, so the job does not land there again until
the node registers anew (ReturnToService) or an administrator resumes it. After a hang, the nodes blamed are
those with a process that did not write its stacks when asked (`_silent_hosts`).
"""

from __future__ import annotations

import argparse
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

from hpc import allocation, stacks
from hpc.config import SlurmConfig
from hpc.ray_cluster import RayNodeLost, lost_hosts, ray_cluster
from hpc.slurm import exclusion
from hpc.slurm import requeue as requeue_job
from hpc.wait import until
from hpc.watchdog import Watchdog
from rl import heartbeat
from rlhpc.run_folder import (FAILED, INTERRUPTED, RESULT, START, attempt_dir, exclude_nodes, is_cancelled,
                              jobs_dir, record_submission)

TEARDOWN_S = 15
"""Of the grace, what stopping Ray and requeueing need after the loop has stopped."""
NODE_DEATH_NOTICE_S = 30
"""At most how long Ray's GCS takes to declare a vanished node dead (health checks 3 s apart, 5 misses, by
default): the delay a driver's failure gets, in a multi-node job, before it is taken for a code error."""
PLANNED_STOP = "stopped before the time limit"
"""Why an attempt that stopped by its own plan (`rl.timings`) ended, as `rlhpc status` shows it."""
STACKS_WRITE_S = 3
"""How long the processes asked for their stacks get to write them before the job ends."""
ASKED = ".asked"
"""Beside the stacks, `<host>.asked`: the stack files whose processes that host's task asked to write."""

log = logging.getLogger("rlhpc.job")
_requeueing = threading.Event()
"""Set while this process requeues its job: SIGTERM then only marks the job's end (see `_requeue`)."""
_ended = threading.Event()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    if _requeueing.is_set():
        _ended.set()
        return
    raise SystemExit(128 + signum)


def _requeue(job_id: str, exclude: str) -> None:
    """`scontrol requeue` and the ExcNodeList update after it. The requeue's SIGTERM comes between the two and,
    as SystemExit, would cut the update short: the handler only notes it until both are done (the commands
    hold the signal back themselves, `hpc.slurm.requeue`), and then it is sent again to end the job."""
    _requeueing.set()
    try:
        requeue_job(job_id, exclude=exclude)
    finally:
        _requeueing.clear()
        if _ended.is_set():
            os.kill(os.getpid(), signal.SIGTERM)


def requeue_if_allowed(folder: Path, attempt: Path, job_id: str, restart_count: int, slurm: SlurmConfig,
                       record: dict[str, Any], *, failed_nodes: list[str] | None = None, in_slurm: bool = True) -> bool:
    """Record the interruption in the attempt's folder and requeue the job unless it runs outside Slurm, the
    run was cancelled or it has used its `max_requeues`. The nodes the attempt ended for (`failed_nodes`) are
    left behind by the rest of the run, requeued or resumed (see the module's doc). Requeueing ends this job at
    once: it is the last thing a job does."""
    requeue = in_slurm and not is_cancelled(folder) and restart_count < slurm.max_requeues
    failed = failed_nodes if in_slurm and failed_nodes else []
    excluded = exclude_nodes(folder, failed, record.get("reason") or "", job_id, restart_count,
                             slurm.max_excluded_nodes)
    if kept := [n for n in failed if n not in excluded]:
        log.warning("node %s not left behind: the run excludes %d already (slurm.max_excluded_nodes)",
                    ", ".join(kept), len(excluded))
    attempt.mkdir(parents=True, exist_ok=True)
    (attempt / INTERRUPTED).write_text(json.dumps({**record, "time": time.time(), "requeued": requeue,
                                                   "failed_nodes": failed}))
    if requeue:
        exclude = exclusion(slurm.additional_parameters.get("exclude"), excluded) if excluded else ""
        try:
            _requeue(job_id, exclude)
        except OSError as e:  # another task of the job got there first
            log.warning("%s", e)
    elif in_slurm:
        log.warning("not requeued: %s", "the run was cancelled" if is_cancelled(folder) else
                    f"{restart_count} requeues already (slurm.max_requeues)")
    return requeue


def run_job(run_dir: str) -> dict[str, Any] | None:
    """Entry of every task. Rank 0 returns the run's summary; the other ranks return None."""
    from rl.interrupt import StopRequest
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
    log.info("job %s, node %s (rank %d of %d), attempt %s", alloc.job_id, alloc.host, alloc.node_rank,
             alloc.num_nodes, attempt)
    # scancel, a node failure or the end of the step sends SIGTERM before SIGKILL (submitit ignores it):
    # unwind, so that Ray is stopped on this node instead of outliving the job.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Knowing the job's end, the loop stops by itself while a checkpoint still fits, signal or not.
    end = allocation.end_time(alloc.job_id) if in_slurm and alloc.node_rank == 0 else None
    stop = StopRequest(end=None if end is None else end - TEARDOWN_S)
    # It replaces submitit's handler for the stop signal, which would requeue at once, without a checkpoint.
    stop_signal = getattr(signal, f"SIG{cfg.slurm.signal}")
    grace = max(0, cfg.slurm.signal_grace_s - TEARDOWN_S)
    signal.signal(stop_signal, (lambda signum, frame: stop.set(grace, reason=cfg.slurm.signal))
                  if alloc.node_rank == 0 else signal.SIG_IGN)
    stacks_dir = attempt / "stacks"
    stacks.register(stacks_dir)

    def interrupted(record: dict[str, Any], failed_nodes: list[str] | None = None) -> bool:
        return requeue_if_allowed(folder, attempt, alloc.job_id, alloc.restart_count, cfg.slurm, record,
                                  failed_nodes=failed_nodes, in_slurm=in_slurm)

    def end_job(reason: str) -> None:
        """The watchdog's verdict: stacks of this node's processes into the attempt's folder; rank 0 then
        ends the job, requeued where Slurm runs it, off the nodes the verdict blames (the lost ones; after a
        hang, those whose processes did not answer)."""
        asked = stacks.dump(stacks_dir)
        (stacks_dir / f"{alloc.host}{ASKED}").write_text("".join(f"{p.name}\n" for p in asked))
        time.sleep(STACKS_WRITE_S)
        if alloc.node_rank != 0:
            return
        blamed = watchdog.blamed
        if not blamed and (blamed := _silent_hosts(stacks_dir)):
            reason += f"; a process of {', '.join(blamed)} wrote no stacks (stopped)"
        if not interrupted({"signal": None, "stopped_at": None, "reason": reason}, blamed):
            os.kill(os.getpid(), signal.SIGTERM)  # nothing to requeue: end this job the way scancel would

    watchdog = Watchdog(folder / heartbeat.FILE, cfg.run.hang_timeout_s, end_job,
                        lost_hosts=(lambda: lost_hosts(alloc)) if alloc.node_rank == 0 else None,
                        node_timeout_s=cfg.run.node_timeout_s)
    watchdog.start()
    try:
        with ray_cluster(alloc, attempt, cfg.ray, cfg.slurm.env, ignore_signals=(stop_signal,),
                         stacks_dir=stacks_dir) as cluster:
            if cluster is None:
                return None
            (attempt / "cluster.json").write_text(json.dumps({"address": cluster.address, "nodes": cluster.nodes}))
            try:
                result = run_loop(cfg, folder, ray_address=cluster.address, stop=stop, start_record=attempt / START)
            except Exception as e:
                if in_slurm and (lost := _lost_with(alloc, min(cfg.run.node_timeout_s, NODE_DEATH_NOTICE_S))):
                    interrupted({"signal": None, "stopped_at": None,
                                 "reason": f"node {', '.join(lost)} lost ({type(e).__name__})"}, lost)
                    return None
                raise
            finally:
                watchdog.stop()  # before Ray goes down, which it would take for lost nodes
            rows = result["rows"]
            summary = {"run_dir": str(folder), "job_id": alloc.job_id, "rollouts": len(rows),
                       "last_reward": rows[-1]["reward_mean"] if rows else None, "ray_nodes": cluster.nodes,
                       "workers": result["workers"], "stopped_at": result["stopped_at"]}
            (attempt / RESULT).write_text(json.dumps(summary))
    except RayNodeLost as e:
        # This node's Ray died under the run: the job cannot go on, but it can start again, without this node
        # where the fault was its own.
        if not in_slurm:
            raise
        interrupted({"signal": None, "stopped_at": None, "reason": str(e)}, [e.host] if e.host else None)
        return None
    except Exception as e:
        if alloc.node_rank == 0:  # for `rlhpc status` once Slurm has forgotten the job
            attempt.mkdir(parents=True, exist_ok=True)
            (attempt / FAILED).write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "time": time.time()}))
        raise
    finally:
        watchdog.stop()
    if result["stopped_at"] is not None:
        planned = result["stop_reason"] == "deadline"
        interrupted({"signal": None if planned else cfg.slurm.signal, "stopped_at": result["stopped_at"],
                     **({"reason": PLANNED_STOP} if planned else {})})
    return summary


def _lost_with(alloc: allocation.Allocation, wait_s: float) -> list[str]:
    """The hosts gone from Ray when the driver failed. The failure may reach the driver before Ray has declared
    the node dead: an actor that died with it, or a collective whose peer vanished (gloo's "Connection closed
    by peer" inside a training step), so this waits up to `wait_s` for Ray to notice."""
    if len(alloc.hosts) < 2:
        return []
    until(lambda: bool(lost_hosts(alloc)), wait_s, poll_s=1)
    return lost_hosts(alloc)


def _silent_hosts(stacks_dir: Path) -> list[str]:
    """The hosts with a process that was asked for its stacks and wrote none: stopped (SIGSTOP, a debugger) or
    stuck in the kernel (a dead filesystem or driver), where one blocked in a collective or a lock still
    answers. A host whose task has not said what it asked (its watchdog not yet triggered) is not judged."""
    return [asked.name.removesuffix(ASKED) for asked in sorted(stacks_dir.glob(f"*{ASKED}"))
            if any(not (stacks_dir / name).is_file() or (stacks_dir / name).stat().st_size == 0
                   for name in asked.read_text().split())]


def requeue_stuck(run_dir: str, reason: str) -> bool:
    """The batch shell's fallback: the tasks did not end within the grace after the signal."""
    from rlhpc.config import load_config

    folder = Path(run_dir)
    cfg = load_config(folder / "config.toml")
    job_id, restart = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return requeue_if_allowed(folder, attempt_dir(folder, job_id, restart), job_id, restart, cfg.slurm,
                              {"signal": cfg.slurm.signal, "stopped_at": None, "reason": reason})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhpc.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--requeue", metavar="REASON", help="requeue the job from its batch shell, for REASON")
    parser.add_argument("--after", type=float, default=0, metavar="S", help="wait S seconds before requeueing")
    args = parser.parse_args(argv)
    if args.requeue:
        time.sleep(args.after)
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        requeue_stuck(args.run_dir, args.requeue)
    else:
        run_job(args.run_dir)


if __name__ == "__main__":  # the entry of rendered sbatch scripts and of their fallback requeue
    main()
