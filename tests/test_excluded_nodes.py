"""A failed node is left behind: the run folder's record, its cap, the scontrol calls of the requeue, the
SIGTERM that the requeue brings before its update, and the next submission's `--exclude` (no cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MINIMAL
from hpc.config import SlurmConfig
from hpc.slurm import exclusion, requeue, requeue_commands
from rlhpc import job
from rlhpc.config import load_config
from rlhpc.job import requeue_if_allowed
from rlhpc.run_folder import exclude_nodes, excluded_nodes, freeze, leaving_behind, newly_excluded
from rlhpc.render import render
from rlhpc.submit import sbatch_script

ROOT = Path(__file__).resolve().parents[1]


def test_newly_excluded_adds_each_failed_node_once_up_to_the_cap() -> None:
    assert newly_excluded([], ["node2", "node2"], cap=2) == ["node2"]
    assert newly_excluded(["node2"], ["node2", "node3", "node4"], cap=2) == ["node3"]
    assert newly_excluded(["node2", "node3"], ["node4"], cap=2) == []
    assert newly_excluded([], ["node2"], cap=0) == []


def test_the_run_folder_keeps_each_excluded_node_with_why(tmp_path: Path) -> None:
    assert exclude_nodes(tmp_path, ["node2"], "node node2 lost", "41", 0, cap=2) == ["node2"]
    assert exclude_nodes(tmp_path, ["node2", "node3", "node4"], "node node3 lost", "41", 1, cap=2) == [
        "node2", "node3"]
    assert exclude_nodes(tmp_path, [], "USR2", "41", 2, cap=2) == ["node2", "node3"]
    with (tmp_path / "excluded_nodes.jsonl").open("a") as f:  # another task recorded node2 as well
        f.write(json.dumps({"node": "node2", "reason": "Ray on node2 stopped"}) + "\n")
    assert [(e["node"], e["reason"], e["attempt"]) for e in excluded_nodes(tmp_path)] == [
        ("node2", "node node2 lost", 0), ("node3", "node node3 lost", 1)]


def test_the_requeue_updates_excnodelist_after_the_requeue() -> None:
    assert requeue_commands("41") == [["scontrol", "requeue", "41"]]
    assert requeue_commands("41", "gpu7,node2") == [["scontrol", "requeue", "41"],
                                                    ["scontrol", "update", "JobId=41", "ExcNodeList=gpu7,node2"]]
    assert exclusion("node[1-3,5],gpu7", ["node2", "gpu7"]) == "node[1-3,5],gpu7,node2"
    assert exclusion(None, ["node2"]) == "node2" and exclusion(None, []) == ""


def test_the_update_is_made_even_when_another_task_requeued_the_job_first(tmp_path, monkeypatch) -> None:
    log = tmp_path / "scontrol.log"
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                                       '[ "$1" = requeue ] && echo "Requested operation is presently disabled" >&2 '
                                       "&& exit 1\nexit 0\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(OSError, match="scontrol requeue 41 failed: Requested operation is presently disabled$"):
        requeue("41", exclude="node2")
    assert log.read_text().splitlines() == ["requeue 41", "update JobId=41 ExcNodeList=node2"]


@pytest.fixture
def requeued(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(job, "requeue_job", lambda job_id, exclude="": calls.append((job_id, exclude)))
    return calls


def test_an_attempt_ended_for_a_node_requeues_off_every_node_the_run_left_behind(tmp_path, requeued) -> None:
    slurm = SlurmConfig(max_excluded_nodes=2, additional_parameters={"exclude": "gpu7"})
    attempt = tmp_path / "jobs" / "41" / "attempt-0"
    lost = {"signal": None, "stopped_at": None, "reason": "node node2 lost (ActorDiedError)"}
    assert requeue_if_allowed(tmp_path, attempt, "41", 0, slurm, lost, failed_nodes=["node2"])
    assert requeued == [("41", "gpu7,node2")]
    assert json.loads((attempt / "interrupted.json").read_text())["failed_nodes"] == ["node2"]
    # a preemption later: no node to blame, the run's exclusions still stand
    requeue_if_allowed(tmp_path, attempt.with_name("attempt-1"), "41", 1, slurm, {"signal": "USR2", "stopped_at": 3})
    # two more nodes fail: the cap of 2 lets one of them in
    requeue_if_allowed(tmp_path, attempt.with_name("attempt-2"), "41", 2, slurm, lost, failed_nodes=["node3", "node4"])
    assert requeued[1:] == [("41", "gpu7,node2"), ("41", "gpu7,node2,node3")]
    assert list(excluded_nodes(tmp_path)[0]) == ["node", "reason", "job_id", "attempt", "time"]


def test_no_node_is_left_behind_outside_slurm_or_with_a_cap_of_zero(tmp_path, requeued) -> None:
    lost = {"signal": None, "stopped_at": None, "reason": "node node2 lost"}
    attempt = tmp_path / "attempt-0"
    assert not requeue_if_allowed(tmp_path, attempt, "41", 0, SlurmConfig(), lost, failed_nodes=["node2"],
                                  in_slurm=False)
    requeue_if_allowed(tmp_path, attempt, "41", 0, SlurmConfig(max_excluded_nodes=0), lost, failed_nodes=["node2"])
    assert requeued == [("41", "")] and excluded_nodes(tmp_path) == []


def test_after_a_hang_the_hosts_with_a_process_that_wrote_no_stacks_are_blamed(tmp_path: Path) -> None:
    (tmp_path / "node1-10.txt").write_text("Thread 0x1 (most recent call first): ...")
    (tmp_path / "node1-11.txt").write_text("")  # stopped: asked, never answered
    (tmp_path / "node2-20.txt").write_text("Thread 0x2 ...")
    (tmp_path / "node1.asked").write_text("node1-10.txt\nnode1-11.txt\n")
    (tmp_path / "node2.asked").write_text("node2-20.txt\n")
    (tmp_path / "node3-30.txt").write_text("")  # node3's task has not dumped yet: not judged
    assert job._silent_hosts(tmp_path) == ["node1"]
    (tmp_path / "node1-11.txt").write_text("Thread 0x3 ...")
    assert job._silent_hosts(tmp_path) == []


FAKE_SCONTROL = """#!{python}
import os, signal, sys, time
log = open({log!r}, "a", buffering=1)
log.write(" ".join(sys.argv[1:]) + "\\n")
os.kill(0, signal.SIGTERM)  # as slurmstepd ends a requeued job: every process of it (the real scontrol holds it too)
if sys.argv[1] == "update":
    time.sleep(0.3)
    log.write("updated\\n")
"""
JOB = """
import signal, sys, threading, time
from rlhpc import job
signal.signal(signal.SIGTERM, job._exit_on_sigterm)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # as Ray's: a thread that takes the signal
job._requeue("41", "node2")
time.sleep(5)
sys.exit(0)  # not reached: the SIGTERM noted during the requeue ends the job once the update is done
"""


def test_the_requeues_own_sigterm_waits_for_the_excnodelist_update(tmp_path: Path) -> None:
    log = tmp_path / "scontrol.log"
    (tmp_path / "scontrol").write_text(FAKE_SCONTROL.format(python=sys.executable, log=str(log)))
    (tmp_path / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", JOB], env=env, capture_output=True, text=True, timeout=30,
                          start_new_session=True)  # its own process group, for `kill 0`
    assert done.returncode == 128 + 15, done.stderr
    assert log.read_text().splitlines() == ["requeue 41", "update JobId=41 ExcNodeList=node2", "updated"]


def test_a_new_submission_of_the_run_excludes_the_nodes_it_left_behind(tmp_path, write_config) -> None:
    cfg = load_config(write_config("[run]\noutput_dir = 'run'\n[slurm]\nadditional_parameters = "
                                   "{ exclude = 'gpu[1-2]' }\n" + MINIMAL))
    assert leaving_behind(cfg) is cfg
    freeze(cfg)  # a run that was submitted once
    exclude_nodes(cfg.run_dir(), ["node2"], "node node2 lost", "41", 0, cap=2)
    left = leaving_behind(cfg)
    assert left.slurm.additional_parameters == {"exclude": "gpu[1-2],node2"}
    assert leaving_behind(left).slurm.additional_parameters == {"exclude": "gpu[1-2],node2"}  # once
    assert cfg.slurm.additional_parameters == {"exclude": "gpu[1-2]"}
    assert "#SBATCH --exclude='gpu[1-2],node2'\n" in sbatch_script(cfg, cfg.run_dir())  # what --dry-run shows
    assert "#SBATCH --exclude='gpu[1-2],node2'\n" in render(cfg, replace=True)  # a plain sbatch script too
