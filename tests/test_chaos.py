"""Nothing lost, exactly: the tiny run interrupted on the real local cluster (during a rollout or training; by
`scontrol requeue`, the time-limit signal, a preempting job, the time limit itself, a hang) ends with bitwise
the final weights and the reward columns of the same run uninterrupted; a failed node and a hang requeue the job,
the failed node left behind.

`make test` runs a reduced matrix (REDUCED) and a whole node's failure; `make chaos` (RLHPC_CHAOS=full) all of
it, the real time limit, and the `drill --node-loss` of a node's Ray alone.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, SHAPE, STATE, rlhpc, tiny_settings, wait_gone
from hpc.local_cluster import netns_processes
from hpc.slurm import release
from rl import checkpoint, heartbeat
from rl.export import load_policy
from rl.timings import Timings
from rlhpc.drill import wait_for_phase, wait_resumed
from rlhpc.job import PLANNED_STOP

pytestmark = pytest.mark.slurm

FULL = os.environ.get("RLHPC_CHAOS") == "full"
# The signal's path through a real preemption, while generating; a job killed during training without a word is
# the hang test below (its watchdog requeues the job). The time-limit signal takes the preemption's path.
# A tiny model's checkpoint save lasts a fraction of a second: the full matrix aims at it all the same (the drill
# polls the phase every 20 ms); a kill at each step of a save is tested in test_checkpoint, a signal in test_loop.
REDUCED = [("preempt", "rollout")]
MATRIX = list(itertools.product(("requeue", "timeout", "preempt"), ("rollout", "train", "save"))) if FULL else REDUCED
REWARD_COLUMNS = ("rollout_id", "reward_mean", "reward_std", "response_len_mean", "truncated_frac")


def submit(env: dict[str, str], model_dir: Path, run_dir: Path, *extra: str, num_rollout: int = 6,
           samples: int = 8) -> str:
    """The tiny run (`conftest.tiny_settings`); its job id."""
    done = rlhpc("submit", str(CONFIGS / "tiny_cpu.toml"), *tiny_settings(model_dir, run_dir, num_rollout, samples),
                 *extra, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads((run_dir / "submissions.jsonl").read_text().splitlines()[-1])["job_id"]


def outcome(run_dir: Path, model_dir: Path) -> tuple[str, dict[str, torch.Tensor], list[dict]]:
    folder = checkpoint.latest(run_dir / "checkpoints")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return folder.name, load_policy(folder, model_dir).state_dict(), [{k: r[k] for k in REWARD_COLUMNS} for r in rows]


def assert_same(got, expected) -> None:
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys()
    assert [k for k in got[1] if not torch.equal(got[1][k], expected[1][k])] == []  # bitwise
    assert got[2] == expected[2]


@pytest.fixture(scope="module")
def uninterrupted(tiny_on_two_nodes, tiny_model_dir):
    """The same run uninterrupted: test_slurm_cluster's end-to-end run, made once for both modules."""
    return outcome(tiny_on_two_nodes.run_dir, tiny_model_dir)


@pytest.mark.parametrize(("kind", "phase"), MATRIX, ids=[f"{k}-during-{p}" for k, p in MATRIX])
def test_an_interrupted_run_ends_bitwise_as_the_uninterrupted_one(cluster, tiny_model_dir, tmp_path, uninterrupted,
                                                                   kind, phase):
    run_dir = tmp_path / "run"
    # interrupted while a checkpoint is written in the background: never half of one loaded
    async_save = ["--set", "ckpt.async_save=true"] if phase == "save" else []
    job = submit(cluster.env, tiny_model_dir, run_dir, *async_save)
    drilled = rlhpc("drill", str(run_dir), f"--{kind}", "--at", phase, "--wait", env=cluster.env, timeout=900)
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert f"during {phase} of rollout" in drilled.stdout and "resumed from checkpoint" in drilled.stdout
    wait_gone(job, cluster.env)
    assert_same(outcome(run_dir, tiny_model_dir), uninterrupted)
    [row] = json.loads(rlhpc("status", str(run_dir), "--json", env=cluster.env).stdout)
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1 and row["rollout"] == 6
    if kind == "requeue":  # killed without a word: the next attempt redid what the last checkpoint missed
        assert row["interruptions"][0].startswith("ended without a signal")
    else:  # the signal: a checkpoint where it stopped, nothing redone
        assert row["interruptions"][0].startswith("USR2 at rollout") and row["interruptions"][0].endswith(", 0 redone")


LONG_RUN = 80
"""Rollouts of the config's own batch (32 samples per prompt): a run that needs several 2-minute attempts."""


@pytest.fixture(scope="module")
def long_straight(cluster, tiny_model_dir, tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    wait_gone(submit(cluster.env, tiny_model_dir, straight, num_rollout=LONG_RUN, samples=32), cluster.env)
    return outcome(straight, tiny_model_dir)


def until_done(env: dict[str, str], run_dir: Path, job: str, timeout_s: float = 1200) -> dict:
    """Follow a run through its requeues, releasing each from Slurm's requeue delay; its last status row."""
    deadline, released = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        [row] = json.loads(rlhpc("status", str(run_dir), "--json", env=env).stdout)
        if row["state"] in {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}:
            break
        if row["state"] == "PENDING" and row["requeues"] > released:
            release(job, env)
            released = row["requeues"]
        time.sleep(2)
    return row


@pytest.mark.skipif(not FULL, reason="minutes of waiting for Slurm's own clock: `make chaos`")
@pytest.mark.timeout(1500)
def test_the_time_limit_itself_requeues_until_the_run_is_done(cluster, tiny_model_dir, tmp_path, long_straight):
    """A 2-minute job for a run longer than that: Slurm's signal 60 s before each limit, a checkpoint, a
    requeue, until the run is done; the same weights as the run in one go."""
    job = submit(cluster.env, tiny_model_dir, tmp_path, "--time", "2", "--set", "slurm.signal_grace_s=60",
                 samples=32, num_rollout=LONG_RUN)
    row = until_done(cluster.env, tmp_path, job)
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    assert all(i.startswith("USR2 at rollout") for i in row["interruptions"]), row["interruptions"]
    assert_same(outcome(tmp_path, tiny_model_dir), long_straight)


@pytest.mark.skipif(not FULL, reason="minutes of waiting for Slurm's own clock: `make chaos`")
@pytest.mark.timeout(1500)
def test_without_any_signal_the_run_stops_before_each_time_limit_and_ends_the_same(cluster, tiny_model_dir, tmp_path,
                                                                                    long_straight):
    """No --signal at all, checkpoints written in the background: each attempt learns its end from Slurm, stops
    at the last rollout after which a save still fits, saves and requeues; nothing is redone, and the run ends
    bitwise as the run in one go."""
    job = submit(cluster.env, tiny_model_dir, tmp_path, "--time", "2", "--set", "slurm.signal_grace_s=0",
                 "--set", "ckpt.async_save=true", samples=32, num_rollout=LONG_RUN)
    row = until_done(cluster.env, tmp_path, job)
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    assert all(i.startswith(f"{PLANNED_STOP} at rollout") and i.endswith(", 0 redone")
               for i in row["interruptions"]), row["interruptions"]
    assert Timings.read(tmp_path).save_s is not None
    assert_same(outcome(tmp_path, tiny_model_dir), long_straight)


def node_pids(namespace: str, name: str) -> list[int]:
    """Processes of a node (a network namespace of the local cluster) whose command line starts with `name`."""
    return [pid for pid, cmd in netns_processes(namespace).items() if cmd.startswith(name)]


def wait_for(predicate, timeout_s: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finish_after_requeue(env: dict[str, str], run_dir: Path, job: str) -> dict:
    """Release the requeued job from Slurm's requeue delay, wait for the end; the run's status row."""
    wait_resumed(run_dir, job, 0, 600, env)
    wait_gone(job, env)
    [row] = json.loads(rlhpc("status", str(run_dir), "--json", env=env).stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == list(range(6))  # nothing lost, nothing twice
    assert row["state"] == "COMPLETED" and row["requeues"] == 1, row
    return row


@pytest.mark.skipif(not FULL, reason="the failed-node test below loses Ray with the rest of the node: `make chaos`")
def test_a_node_whose_ray_dies_requeues_the_job_and_the_run_resumes(cluster, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # no node may be left behind: the job runs again on node2, though node3 is free
    job = submit(cluster.env, tiny_model_dir, run_dir, "--nodes", "2", "--set", "slurm.max_excluded_nodes=0")
    drilled = rlhpc("drill", str(run_dir), "--node-loss", "--at", "train", env=cluster.env, timeout=600)
    assert drilled.returncode == 0 and "Ray killed on node2" in drilled.stdout, drilled.stdout + drilled.stderr
    row = finish_after_requeue(cluster.env, run_dir, job)
    assert row["interruptions"][0].startswith("Ray on node2 stopped while the run was going"), row["interruptions"]
    assert row["excluded"] == {}, row
    assert json.loads((run_dir / "jobs" / job / "attempt-1" / "cluster.json").read_text())["nodes"].keys() == {
        "node1", "node2"}


def test_a_failed_node_is_left_behind_and_the_run_ends_bitwise_as_uninterrupted(uninterrupted, cluster,
                                                                                 tiny_model_dir, tmp_path):
    """A power cut on node2 (slurmd, the step, Ray killed at once): rank 0 sees the node gone from Ray and
    requeues the job off node2, which Slurm holds in COMPLETING until the node answers again; once repaired,
    the job runs again, on node1 and the spare node3, and ends as the run uninterrupted."""
    run_dir, env = tmp_path / "run", cluster.env
    job = submit(env, tiny_model_dir, run_dir, "--nodes", "2")
    wait_for_phase(run_dir, "train", 0, 300)
    try:
        failed = rlhpc("cluster", "fail", "node2", "--state-dir", str(STATE))
        assert failed.returncode == 0, failed.stderr
        interrupted = run_dir / "jobs" / job / "attempt-0" / "interrupted.json"
        wait_for(interrupted.exists, 120, "the job to end for the lost node")
        assert json.loads(interrupted.read_text())["reason"].startswith("node node2 lost")
    finally:
        up = rlhpc("cluster", "up", *SHAPE)
        assert up.returncode == 0 and "already up" in up.stdout, up.stderr
    row = finish_after_requeue(env, run_dir, job)
    assert row["interruptions"][0].startswith("node node2 lost"), row["interruptions"]
    assert list(row["excluded"]) == ["node2"] and row["excluded"]["node2"].startswith("node node2 lost"), row
    assert json.loads((run_dir / "jobs" / job / "attempt-1" / "cluster.json").read_text())["nodes"].keys() == {
        "node1", "node3"}
    assert_same(outcome(run_dir, tiny_model_dir), uninterrupted)


def test_a_hung_run_writes_every_stack_requeues_and_ends_bitwise_as_uninterrupted(cluster, tiny_model_dir, tmp_path,
                                                                                   uninterrupted):
    run_dir = tmp_path / "run"
    job = submit(cluster.env, tiny_model_dir, run_dir, "--set", "run.hang_timeout_s=10")
    wait_for(lambda: (heartbeat.read(run_dir) or {}).get("rollout_id", 0) >= 1, what="rollout 1")
    [worker] = node_pids("rlhpc-node1", "ray::TrainWorker")
    os.kill(worker, signal.SIGSTOP)  # a training worker that never answers, as in a collective that hangs
    row = finish_after_requeue(cluster.env, run_dir, job)
    assert row["interruptions"][0].startswith("no progress for"), row["interruptions"]
    # the stopped worker's node is left behind: the job runs again on the other one
    assert list(row["excluded"]) == ["node1"] and "wrote no stacks" in row["excluded"]["node1"], row
    assert json.loads((run_dir / "jobs" / job / "attempt-1" / "cluster.json").read_text())["nodes"].keys() == {
        "node2"}
    dumps = {p.name: p.read_text() for p in (run_dir / "jobs" / job / "attempt-0" / "stacks").glob("*.txt")}
    assert len([d for d in dumps.values() if d]) >= 2  # the driver's and the engine's at least (not the stopped one)
    assert any("in train" in d and "rl/loop.py" in d for d in dumps.values())  # the driver, waiting on training
    assert_same(outcome(run_dir, tiny_model_dir), uninterrupted)  # killed mid-training: redone, exactly
