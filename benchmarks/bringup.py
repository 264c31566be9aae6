"""Ray bring-up inside a Slurm allocation: time from the job's start to "all nodes joined, driver started",
on the local cluster (`rlhpc cluster up`), for 2 and 4 nodes, against the fixed sleeps of the published
Ray-on-Slurm scripts.

    sudo .venv/bin/rlhpc cluster up --nodes 4 --cpus-per-node 2
    SLURM_CONF=/tmp/rlhpc-cluster/slurm.conf .venv/bin/python benchmarks/bringup.py --nodes 2 4 --repeats 3

Each job runs `hpc.ray_cluster.ray_cluster` on every node, as `rlhpc submit` does; rank 0 notes the moment the
GCS shows every node with its CPUs and the driver is connected. Two figures per job:
- from Slurm's StartTime (1 s resolution): everything the user waits for once the job runs, including srun,
  Python and submitit start-up on each node;
- from the first task's entry into the bring-up: Ray's own start and the join detection.
The fixed-sleep baselines are the sleeps alone (verl's `ray_on_slurm.slurm`: 10 s + 5 s per node; OpenRLHF's
script: 10 s + 1 s per node + 30 s), a lower bound of those scripts' bring-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe(folder: str) -> dict | None:
    """Every task: bring Ray up; rank 0 returns its timings."""
    entered = time.time()
    from hpc.allocation import current
    from hpc.config import RayConfig
    from hpc.ray_cluster import ray_cluster

    alloc = current()
    (Path(folder) / f"entered-{alloc.node_rank}").write_text(str(entered))
    with ray_cluster(alloc, Path(folder) / alloc.job_id, RayConfig(join_timeout_s=60)) as cluster:
        if cluster is None:
            return None
        ready = time.time()
        return {"nodes": cluster.nodes, "ready": ready}


def start_time(job_id: str) -> float:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    field = next(f for f in out.stdout.split() if f.startswith("StartTime="))
    return time.mktime(time.strptime(field.split("=", 1)[1], "%Y-%m-%dT%H:%M:%S"))


def one_job(nodes: int, cpus: int) -> dict:
    import submitit

    from rlhpc.submit import Submitted, wait

    folder = Path(tempfile.mkdtemp(prefix="bringup-", dir=ROOT / "runs"))
    ex = submitit.SlurmExecutor(folder=folder / "%j")
    ex.update_parameters(nodes=nodes, ntasks_per_node=1, cpus_per_task=cpus, time=10,
                         srun_args=["--kill-on-bad-exit=1"])
    job = ex.submit(probe, str(folder))
    result = wait(Submitted(folder, str(job.job_id), "slurm", job), poll_s=0.5)
    entered = min(float(p.read_text()) for p in folder.glob("entered-*"))
    return {"nodes": nodes, "joined": len(result["nodes"]), "addresses": sorted(result["nodes"].values()),
            "from_slurm_start_s": result["ready"] - start_time(str(job.job_id)),
            "from_first_task_s": result["ready"] - entered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus-per-task", type=int, default=1)
    args = ap.parse_args()
    if "SLURM_CONF" not in os.environ:
        sys.exit("set SLURM_CONF to the local cluster's slurm.conf (see the docstring)")
    (ROOT / "runs").mkdir(exist_ok=True)
    print("| nodes | from Slurm start (s) | from first task (s) | verl sleeps (s) | OpenRLHF sleeps (s) |")
    print("|---|---|---|---|---|")
    for n in args.nodes:
        runs = [one_job(n, args.cpus_per_task) for _ in range(args.repeats)]
        assert all(r["joined"] == n and len(set(r["addresses"])) == n for r in runs), runs
        slurm = [r["from_slurm_start_s"] for r in runs]
        task = [r["from_first_task_s"] for r in runs]
        print(f"| {n} | {statistics.median(slurm):.1f} (max {max(slurm):.1f}) | {statistics.median(task):.1f} "
              f"(max {max(task):.1f}) | {10 + 5 * n} | {10 + n + 30} |", flush=True)
        print(json.dumps(runs), file=sys.stderr)


if __name__ == "__main__":
    main()
