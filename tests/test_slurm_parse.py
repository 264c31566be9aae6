"""`squeue` / `sacct` output of several Slurm versions, read into one JobInfo shape."""

import json
from pathlib import Path

import pytest

from hpc.slurm import JobInfo, jobs_from_format, jobs_from_json, number, state_of

DATA = Path(__file__).parent / "data" / "squeue"


def load(name: str) -> dict[str, JobInfo]:
    return {j.job_id: j for j in jobs_from_json(json.loads((DATA / name).read_text()))}


def test_22_05_recorded() -> None:
    jobs = load("22.05.json")
    assert set(jobs) == {"3", "4", "5", "6"}
    assert (jobs["3"].state, jobs["3"].reason, jobs["3"].exit_code) == ("FAILED", "NonZeroExitCode", 15)
    running = jobs["5"]
    assert (running.state, running.nodes, running.nodelist, running.time_limit_s) == ("RUNNING", 2, "node[1-2]", 600)
    assert running.reason == "" and running.restarts == 0
    assert running.time_left_s(now=running.start_time + 100) == 500
    pending = jobs["6"]
    assert (pending.state, pending.reason, pending.start_time, pending.elapsed_s()) == (
        "PENDING", "Resources", None, None)


@pytest.mark.parametrize("name", ["23.11.json", "24.11.json"])
def test_newer_releases_recorded(name: str) -> None:
    """Data parsers v0.0.40 and v0.0.42: states as lists, numbers as {set, infinite, number}, exit code an
    object, a job without a time limit's limit unset; finished jobs listed since rlhpc asks with --states=all."""
    jobs = load(name)
    done, failed, running, pending = (jobs[k] for k in "1234")
    assert (done.state, done.exit_code, done.time_limit_s) == ("COMPLETED", 0, None)
    assert (failed.state, failed.reason, failed.exit_code) == ("FAILED", "NonZeroExitCode", 3)
    assert (running.state, running.nodes, running.nodelist, running.time_limit_s) == ("RUNNING", 1, "node1", 600)
    assert running.time_left_s(now=running.start_time + 100) == 500
    assert (pending.state, pending.reason, pending.start_time, pending.nodelist) == ("PENDING", "Resources", None, "")


@pytest.mark.parametrize("name", ["23.11-schema.json", "24.05.json"])
def test_newer_data_parsers(name: str) -> None:
    jobs = load(name)
    running, pending, failed = jobs["41"], jobs["42"], jobs["43"]
    assert (running.state, running.nodes, running.time_limit_s, running.restarts) == ("RUNNING", 2, 3600, 1)
    assert running.start_time == 1795409256
    assert (pending.state, pending.reason, pending.time_limit_s, pending.start_time) == (
        "PENDING", "Priority", None, None)
    assert (failed.state, failed.exit_code) == ("FAILED", 1)


def test_sacct_nests_state_and_times() -> None:
    [job] = jobs_from_json(json.loads((DATA / "sacct-23.11-schema.json").read_text()))
    assert (job.job_id, job.state, job.nodes, job.restarts, job.time_limit_s) == ("44", "COMPLETED", 2, 2, 7200)
    assert (job.start_time, job.exit_code) == (1795400000, 0)


def test_plain_format_fallback() -> None:
    text = ("77|rlhpc-tiny|RUNNING|None|2|node[1-2]|batch|1-02:00:00|2026-11-23T04:00:00|2026-11-23T03:59:00\n"
            "78|rlhpc-big|PENDING|Priority|4||gpu|UNLIMITED|N/A|2026-11-23T04:01:00\n")
    running, pending = jobs_from_format(text)
    assert (running.job_id, running.state, running.reason, running.nodes) == ("77", "RUNNING", "", 2)
    assert running.time_limit_s == 26 * 3600
    assert running.start_time is not None
    assert (pending.state, pending.reason, pending.time_limit_s, pending.start_time) == (
        "PENDING", "Priority", None, None)


def test_number_and_state_of_every_shape() -> None:
    assert number(5) == 5 and number({"set": True, "infinite": False, "number": 5}) == 5
    assert number({"set": False, "number": 0}) is None and number({"set": True, "infinite": True}) is None
    assert state_of("RUNNING") == "RUNNING" and state_of(["PENDING", "REQUEUED"]) == "PENDING"
    assert state_of([]) == "UNKNOWN"


def test_sacct_22_05_recorded() -> None:
    jobs = {j.job_id: j for j in jobs_from_json(json.loads((DATA / "sacct-22.05.json").read_text()))}
    assert {(j.state, j.nodes, j.nodelist, j.exit_code) for j in jobs.values()} == {("COMPLETED", 2, "node[1-2]", 0)}
    assert all(j.start_time and j.time_limit_s is None for j in jobs.values())


def test_sacct_23_11_recorded() -> None:
    jobs = {j.job_id: j for j in jobs_from_json(json.loads((DATA / "sacct-23.11.json").read_text()))}
    assert {k: (j.state, j.exit_code, j.nodelist) for k, j in jobs.items()} == {
        "1": ("COMPLETED", 0, "node1"), "2": ("FAILED", 3, "node1"), "3": ("RUNNING", 0, "node1"),
        "4": ("PENDING", 0, "")}  # sacct names no nodes of a pending job ("None assigned")
    assert jobs["3"].time_limit_s == 600 and jobs["3"].start_time and jobs["4"].start_time is None


def test_20_11_plain_format_recorded() -> None:
    """Slurm 20.11 has no `squeue --json`: the plain format rlhpc asks for instead, recorded."""
    jobs = {j.job_id: j for j in jobs_from_format((DATA / "20.11.txt").read_text())}
    assert {k: (j.state, j.reason, j.nodelist, j.time_limit_s) for k, j in jobs.items()} == {
        "2": ("COMPLETED", "", "node1", None), "3": ("FAILED", "NonZeroExitCode", "node1", None),
        "4": ("RUNNING", "", "node1", 600), "5": ("PENDING", "Resources", "", 600)}
    assert jobs["4"].start_time > jobs["4"].submit_time - 1 and jobs["5"].start_time is None
