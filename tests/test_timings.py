"""The stop planned before the job's end: what it plans with, where the job's end comes from, and the warnings
when the stop signal's grace is shorter than a measured save."""

from __future__ import annotations

import json

from hpc.allocation import end_time
from hpc.config import SlurmConfig
from rl.timings import FILE, SAVE_MARGIN, Timings
from rlhpc.cli import _grace_short_of_save
from rlhpc.job import PLANNED_STOP
from rlhpc.run_folder import INTERRUPTED, START, attempt_dir
from rlhpc.status import _interruptions


def test_another_rollout_and_a_save_must_fit_in_the_time_left():
    t = Timings(save_s=30.0, step_s=100.0)
    assert t.room_for(100 + SAVE_MARGIN * 30) and not t.room_for(100 + SAVE_MARGIN * 30 - 1)
    assert Timings(save_s=None, step_s=100.0).room_for(100) and not Timings(step_s=100.0).room_for(99)
    assert Timings().room_for(0)  # nothing measured yet: the signal is the fallback


def test_timings_survive_in_the_run_folder_and_a_damaged_file_is_no_figure(tmp_path):
    Timings(save_s=12.5, step_s=40.0).write(tmp_path)
    assert Timings.read(tmp_path) == Timings(save_s=12.5, step_s=40.0)
    (tmp_path / FILE).write_text('{"save_s": "soon", "step_s": -1}')
    assert Timings.read(tmp_path) == Timings()
    (tmp_path / FILE).write_text("[")
    assert Timings.read(tmp_path) == Timings()


def test_the_jobs_end_is_slurms_variable_where_set():
    assert end_time("7", {"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1900000000"}) == 1900000000.0
    assert end_time("7", {}) is None  # outside Slurm


def test_a_grace_shorter_than_the_measured_save_is_named_with_both_figures(tmp_path):
    slurm = SlurmConfig(signal_grace_s=120)
    assert _grace_short_of_save(slurm, tmp_path) is None  # nothing measured
    Timings(save_s=300.0, step_s=10.0).write(tmp_path)
    warning = _grace_short_of_save(slurm, tmp_path)
    assert "slurm.signal_grace_s (120 s)" in warning and "(300 s," in warning
    assert _grace_short_of_save(SlurmConfig(signal_grace_s=400), tmp_path) is None
    assert _grace_short_of_save(SlurmConfig(signal_grace_s=0), tmp_path) is None  # no signal asked


def test_status_names_a_planned_stop(tmp_path):
    first, second = attempt_dir(tmp_path, "5", 0), attempt_dir(tmp_path, "5", 1)
    for folder in (first, second):
        folder.mkdir(parents=True)
    (first / INTERRUPTED).write_text(json.dumps({"signal": None, "stopped_at": 3, "reason": PLANNED_STOP}))
    (second / START).write_text(json.dumps({"resumed_from": 3, "redone": 0}))
    assert _interruptions(tmp_path, [{"job_id": "5"}]) == [f"{PLANNED_STOP} at rollout 3, 0 redone"]
