"""`rlhpc status`, `logs` and `cancel` on run folders built here (Slurm's side is a JobInfo)."""

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hpc.slurm import JobInfo
from rlhpc.cli import _status_table, app
from rlhpc.run_folder import exclude_nodes, record_submission
from rlhpc.status import collect, duration, find_runs, run_status

runner = CliRunner()
RLHPC = str(Path(os.sys.executable).with_name("rlhpc"))


def make_run(root: Path, name: str, job_id: str, executor: str = "slurm", rollouts: int = 3, total: int = 10,
             outcome: str | None = None) -> Path:
    run = root / "runs" / name
    (run / "jobs" / job_id / "attempt-0").mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "submissions.jsonl").write_text(json.dumps({"job_id": job_id, "executor": executor, "nodes": 2,
                                                       "submitted_at": 0}) + "\n")
    ckpt = run / "checkpoints" / "iter_0000002"
    for sealed in (ckpt, ckpt.with_name("iter_0000003")):  # iter 3: saved on a stop, named by no row
        sealed.mkdir(parents=True)
        (sealed / "manifest.json").write_text("{}")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("3\n")
    rows = [{"rollout_id": i, "reward_mean": 0.1 * i, "num_rollout": total, "timestamp": 1000.0 + 60 * i}
            for i in range(rollouts)]
    rows[1]["checkpoint"] = str(ckpt)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if outcome:  # what rank 0 of the job writes when it returns ("result") or fails ("failed")
        (run / "jobs" / job_id / "attempt-0" / f"{outcome}.json").write_text("{}")
    (run / "jobs" / job_id / f"{job_id}_0_log.out").write_text("hello from rank 0\n")
    (run / "jobs" / job_id / f"{job_id}_1_log.err").write_text("rank 1 says\n")
    return run


def test_running_job_joins_squeue_and_progress(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", "41")
    for k in (1, 2):
        (run / "jobs" / "41" / f"attempt-{k}").mkdir()
        start = {"resumed_from": 3, "redone": k - 1}
        (run / "jobs" / "41" / f"attempt-{k}" / "start.json").write_text(json.dumps(start))
    (run / "jobs" / "41" / "attempt-0" / "interrupted.json").write_text(
        json.dumps({"signal": "USR2", "stopped_at": 3, "time": 0, "requeued": True}))
    info = JobInfo("41", "rlhpc-a", "RUNNING", "", 2, "node[1-2]", "batch", 3600, 5000.0, 4900.0, 2)
    s = run_status(run, {"41": info}, now=5600.0)
    assert (s.state, s.nodes, s.elapsed_s, s.time_left_s, s.requeues) == ("RUNNING", 2, 600.0, 3000.0, 2)
    assert s.interruptions == ["USR2 at rollout 3, 0 redone", "ended without a signal (scontrol requeue, a node "
                               "failure or a resubmission), 1 redone"]
    assert (s.rollout, s.num_rollout, s.last_reward) == (3, 10, pytest.approx(0.2))
    assert s.checkpoint == "iter_0000003" and s.eta_s == 7 * 60.0


def test_finished_jobs_are_read_from_the_run_folder(tmp_path: Path) -> None:
    done = make_run(tmp_path, "done", "7", rollouts=10, outcome="result")
    failed = make_run(tmp_path, "failed", "8", outcome="failed")
    left = make_run(tmp_path, "left", "9")
    got = {s.run: s for s in collect([done, failed, left], env={"PATH": ""})}  # no squeue, no sacct
    assert got["done"].state == "COMPLETED" and got["done"].eta_s is None
    assert got["failed"].state == "FAILED"
    assert got["left"].state == "ENDED"


def test_the_nodes_a_run_left_behind_are_shown_with_why(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", "41", outcome="result")
    exclude_nodes(run, ["node2"], "node node2 lost (ActorDiedError)", "41", 0, cap=2)
    assert run_status(run, {}).excluded == {"node2": "node node2 lost (ActorDiedError)"}
    assert run_status(make_run(tmp_path, "b", "42"), {}).excluded == {}
    console = Console(width=300, record=True)
    console.print(_status_table([run_status(run, {})]))
    shown = console.export_text()
    assert "left behind" in shown and "node2: node node2 lost (ActorDiedError)" in shown


def test_find_runs_by_name_folder_or_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_run(tmp_path, "a", "41")
    make_run(tmp_path, "b", "42")
    monkeypatch.chdir(tmp_path)
    assert find_runs(None) == [Path("runs/a"), Path("runs/b")]
    assert find_runs("b") == [Path("runs/b")] and find_runs(str(a)) == [a] and find_runs("42") == [Path("runs/b")]
    with pytest.raises(LookupError, match="no run folder"):
        find_runs("nope")
    result = runner.invoke(app, ["status", "--json"], env={"PATH": ""})
    assert [r["run"] for r in json.loads(result.output)] == ["a", "b"]


def test_logs_of_a_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path, "a", "41")
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([str(Path(os.sys.executable).with_name("rlhpc")), "logs", "a"], capture_output=True,
                         text=True)
    assert "hello from rank 0" in out.stdout
    out = subprocess.run([str(Path(os.sys.executable).with_name("rlhpc")), "logs", "a", "--node", "1"],
                         capture_output=True, text=True)
    assert "rank 1 says" in out.stdout


def read_until(proc: subprocess.Popen, text: str, timeout_s: float = 30) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} never came; got {seen!r}"
        if select.select([proc.stdout], [], [], 0.2)[0]:
            seen += os.read(proc.stdout.fileno(), 65536).decode()
    return seen


def test_logs_follow_prints_lines_as_they_are_written(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", "41")
    follow = subprocess.Popen([RLHPC, "logs", "a", "-f"], cwd=tmp_path, stdout=subprocess.PIPE)
    try:
        read_until(follow, "hello from rank 0")
        with open(run / "jobs" / "41" / "41_0_log.out", "a") as log:
            log.write("rollout 4 done\n")
        read_until(follow, "rollout 4 done")
    finally:
        follow.kill()
        follow.wait()


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", "41", executor="local", rollouts=3)  # no squeue: its speed is the site's DNS's
    # Ctrl-C's SIGINT, which a shell's background job (a CI runner's, say) would pass on ignored.
    watch = subprocess.Popen([RLHPC, "status", "--watch", "--interval", "0.2"], cwd=tmp_path,
                             stdout=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2)  # started and refreshed a few times
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"rollout_id": 3, "reward_mean": 0.9, "num_rollout": 10, "timestamp": 1200.0}) + "\n")
    time.sleep(1)
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=30)
    assert watch.returncode == 0
    assert "4/10" in out.decode() and "0.900" in out.decode()  # the last refresh stays on screen


def test_cancel_a_local_run_marks_it_and_stops_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    run = make_run(tmp_path, "a", str(sleeper.pid), executor="local")
    (run / "submissions.jsonl").unlink()
    record_submission(run, str(sleeper.pid), "local", 1)  # as `submit` does: with the process's start time
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cancel", "a"])
    assert result.exit_code == 0 and "will not be requeued" in result.output
    assert sleeper.wait(timeout=10) == -15
    assert (run / "cancelled").exists()


def test_duration() -> None:
    assert [duration(s) for s in (None, 59, 61, 3600, 90061)] == ["-", "0:59", "1:01", "01:00:00", "1-01:01:01"]


def test_damaged_run_files_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write cut short (a kill, a full disk) leaves half a line; a stray folder or a damaged record must not
    stop `status` either."""
    run = make_run(tmp_path, "a", "41")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"rollout_id": 3, "rew')
    with (run / "submissions.jsonl").open("a") as f:
        f.write('{"job_id": "4')
    (run / "jobs" / "41" / "attempt-x").mkdir()
    (run / "jobs" / "41" / "attempt-1").mkdir()
    (run / "jobs" / "41" / "attempt-0" / "interrupted.json").write_text("[1, 2")
    (run / "jobs" / "41" / "attempt-1" / "start.json").write_text('["not", "an", "object"]')
    (run / "jobs" / "41" / "attempt-1" / "result.json").write_text("\x00\x01")
    s = run_status(run, {}, now=5600.0)
    assert (s.job_id, s.rollout, s.requeues, s.state) == ("41", 3, 1, "COMPLETED")
    assert len(s.interruptions) == 1
    assert "metrics.jsonl:4: skipped a line" in caplog.text and "submissions.jsonl:2: skipped a line" in caplog.text
    result = runner.invoke(app, ["status", str(run)], terminal_width=400)
    assert result.exit_code == 0 and "Traceback" not in result.output


def test_plot_skips_a_truncated_last_line(tmp_path: Path) -> None:
    from rl.plot import plot_run

    run = make_run(tmp_path, "a", "41")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"rollout_id": 3, "rew')
    assert plot_run(run / "metrics.jsonl", tmp_path / "c.png").stat().st_size > 0
