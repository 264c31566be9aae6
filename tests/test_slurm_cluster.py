"""End to end on a real Slurm: `rlhpc cluster up`, a 2-node `rlhpc submit` of the tiny run, `cluster down`.

Needs root and Debian's Slurm packages (`make test` installs them where it runs as root)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, RLHPC, SHAPE, STATE, SlurmRun, rlhpc
from hpc.local_cluster import LocalCluster, netns_processes
from hpc.slurm import accounting
from rl import heartbeat

pytestmark = pytest.mark.slurm
ACCOUNTING = "--accounting" in SHAPE


def test_cluster_up_is_idempotent_and_reports_its_nodes(cluster: LocalCluster) -> None:
    again = rlhpc("cluster", "up", *SHAPE)
    assert again.returncode == 0 and "already up" in again.stdout
    other = rlhpc("cluster", "up", "--nodes", "2", "--state-dir", str(STATE))
    assert other.returncode == 1 and "another shape" in other.stderr
    status = rlhpc("cluster", "status", "--state-dir", str(STATE))
    assert status.returncode == 0
    for k in (1, 2, 3):
        assert f"node{k}  10.87.0.1{k}  idle" in status.stdout
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %D"], env=cluster.env, capture_output=True, text=True)
    assert sinfo.stdout.split() == ["batch*", "3", "urgent", "3"]
    routes = subprocess.run(["ip", "-n", "rlhpc-node1", "-j", "route"], capture_output=True, text=True, check=True)
    assert [r["dst"] for r in json.loads(routes.stdout)] == ["10.87.0.0/24"]  # the nodes' subnet, nowhere else


def test_submit_two_nodes_end_to_end(cluster: LocalCluster, tiny_on_two_nodes: SlurmRun) -> None:
    """`submit --wait` of the tiny run on both nodes (the run test_chaos compares its interrupted runs with)."""
    run_dir, done = tiny_on_two_nodes.run_dir, tiny_on_two_nodes.submitted
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished: 6 rollouts" in done.stdout

    [sub] = [json.loads(line) for line in (run_dir / "submissions.jsonl").read_text().splitlines()]
    assert sub["executor"] == "slurm" and sub["nodes"] == 2
    attempt = run_dir / "jobs" / sub["job_id"] / "attempt-0"
    ray_nodes = json.loads((attempt / "cluster.json").read_text())["nodes"]
    assert ray_nodes == {"node1": "10.87.0.11", "node2": "10.87.0.12"}  # both nodes, distinct addresses
    result = json.loads((attempt / "result.json").read_text())
    assert {addr for addr, _pid in result["workers"]} == {"10.87.0.11", "10.87.0.12"}  # workers span both
    frozen = (run_dir / "config.toml").read_text()
    assert "actor_num_nodes = 2" in frozen and f'output_dir = "{run_dir}"' in frozen
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6
    assert tiny_on_two_nodes.job_id == sub["job_id"]
    assert tiny_on_two_nodes.leftovers == ""  # no Ray process of the job survives it

    status = rlhpc("status", str(run_dir), "--json", env=cluster.env)
    [row] = json.loads(status.stdout)
    assert (row["job_id"], row["state"], row["nodes"], row["rollout"], row["num_rollout"]) == (
        sub["job_id"], "COMPLETED", 2, 6, 6)
    assert row["last_reward"] == result["last_reward"] and row["checkpoint"] == "iter_0000006"
    table = rlhpc("status", str(run_dir), env={**cluster.env, "COLUMNS": "200"})
    assert "COMPLETED" in table.stdout and f"{result['last_reward']:.3f}" in table.stdout
    if ACCOUNTING:  # sacct knows the job too, as on sites with accounting
        deadline = time.monotonic() + 30
        while not (known := accounting([sub["job_id"]], env=cluster.env)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [(j.job_id, j.state, j.nodes) for j in known] == [(sub["job_id"], "COMPLETED", 2)]


def test_submit_dry_run_prints_the_script_and_submits_nothing(cluster: LocalCluster, tmp_path: Path) -> None:
    out = rlhpc("submit", str(CONFIGS / "tiny_cpu.toml"), "--nodes", "2", "--dry-run", "--partition", "urgent",
                "--time", "1:30:00", "--set", f"run.output_dir='{tmp_path / 'dry'}'", env=cluster.env)
    assert out.returncode == 0, out.stderr
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=urgent",
                 "#SBATCH --time=90", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@120", "#SBATCH --open-mode=append"]:
        assert line in out.stdout
    assert "--kill-on-bad-exit=1" in out.stdout
    assert not (tmp_path / "dry").exists()


def test_a_newline_in_a_value_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    out = rlhpc("render", str(CONFIGS / "tiny_cpu.toml"), "--set", "slurm.partition='batch\necho hi'",
                "--set", f"run.output_dir='{tmp_path / 'r'}'", env=cluster.env)
    assert out.returncode == 2 and "slurm.partition" in out.stderr and "control character" in out.stderr


def node_processes(cluster: LocalCluster) -> list[str]:
    """Every process in the nodes' network namespaces but the slurmds themselves."""
    spec = cluster.spec()
    assert spec is not None
    return [f"{node.netns} {pid}: {cmd[:100]}" for node in spec.node_list()
            for pid, cmd in netns_processes(node.netns).items() if cmd and not cmd.startswith("slurmd ")]


def test_cancel_mid_run_leaves_no_process(cluster: LocalCluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    submitted = rlhpc("submit", str(CONFIGS / "tiny_cpu.toml"), "--nodes", "2", "--cpus-per-task", "2",
                      "--set", f"ckpt.hf_checkpoint='{tiny_model_dir}'", "--set", f"run.output_dir='{run_dir}'",
                      env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 300
    while heartbeat.read(run_dir) is None and time.monotonic() < deadline:  # the driver's actors are up
        time.sleep(0.5)
    assert node_processes(cluster)
    cancelled = rlhpc("cancel", str(run_dir), env=cluster.env)
    assert cancelled.returncode == 0 and (run_dir / "cancelled").exists()
    deadline = time.monotonic() + 30
    while (left := node_processes(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []  # Ray, its workers and the tasks: all gone with the job
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Slurm may still be COMPLETING the job
        [row] = json.loads(rlhpc("status", str(run_dir), "--json", env=cluster.env).stdout)
        if row["state"] != "COMPLETING":
            break
        time.sleep(0.5)
    assert row["state"] == "CANCELLED"


def test_doctor_measures_between_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    out = subprocess.run([*RLHPC, "doctor", "--nodes", "2"], cwd=tmp_path, capture_output=True, text=True,
                         env={**cluster.env, "COLUMNS": "200"}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok PreemptMode" in out.stdout and "REQUEUE (preempt/partition_prio)" in out.stdout
    assert "ok preemption signal" in out.stdout
    assert "(gloo, 2 nodes): bus bandwidth" in out.stdout and "clock skew across nodes" in out.stdout


def test_cluster_down_leaves_nothing(cluster: LocalCluster) -> None:
    down = rlhpc("cluster", "down", "--state-dir", str(STATE))
    assert down.returncode == 0, down.stderr
    assert cluster.leftovers() == []
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("rlhpc-") == 0
    again = rlhpc("cluster", "down", "--state-dir", str(STATE))
    assert again.returncode == 0
