"""`rlhpc drill --wait` on a run folder built here (Slurm's side is a JobInfo)."""

import json
from pathlib import Path

import pytest

from hpc.slurm import JobInfo
from rlhpc import drill
from rlhpc.run_folder import START, attempt_dir


def job(state: str, restarts: int) -> JobInfo:
    return JobInfo("41", "rlhpc-a", state, "", 1, "node1", "batch", None, None, 0.0, restarts)


@pytest.mark.parametrize("row", [job("COMPLETED", 0), None], ids=["completed", "gone"])
def test_a_job_that_ended_unrequeued_ends_the_wait_at_once(tmp_path: Path, monkeypatch, row) -> None:
    """The run finished before the interruption reached it: said at once, not after the whole timeout."""
    monkeypatch.setattr(drill, "queue", lambda ids, env=None: [row] if row else [])
    with pytest.raises(drill.DrillError, match="job 41 ended .* without a requeue"):
        drill.wait_resumed(tmp_path, "41", 0, timeout_s=3600)


def test_a_requeued_job_is_released_and_its_next_attempt_awaited(tmp_path: Path, monkeypatch) -> None:
    answers = iter([job("COMPLETED", 1), job("PENDING", 1)])  # the requeue's ending attempt, then the wait
    monkeypatch.setattr(drill, "queue", lambda ids, env=None: [next(answers)])
    start = attempt_dir(tmp_path, "41", 1) / START

    def release(job_id, env=None):
        start.parent.mkdir(parents=True)
        start.write_text(json.dumps({"resumed_from": 4}))

    monkeypatch.setattr(drill, "release", release)
    assert drill.wait_resumed(tmp_path, "41", 0, timeout_s=3600) == {"resumed_from": 4}
