"""`rlhpc submit` without a cluster: the sbatch options it would use, and the local executor fallback."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CONFIGS
from hpc.config import SlurmConfig
from rlhpc.render import fallback_s, sbatch_options

RLHPC = str(Path(sys.executable).with_name("rlhpc"))


def test_sbatch_options_follow_the_slurm_section(tmp_path: Path) -> None:
    o = sbatch_options(SlurmConfig(nodes=4, partition="gpu", time="2-00:00:00", gpus_per_node=8, exclusive=True,
                                   mem="0", signal="USR1", signal_grace_s=300,
                                   additional_parameters={"reservation": "rl", "requeue": False}), tmp_path, "rlhpc-x")
    assert o["nodes"] == 4 and o["ntasks_per_node"] == 1 and o["time"] == 2880 and o["gpus_per_node"] == 8
    assert o["exclusive"] is True and o["mem"] == "0" and o["job_name"] == "rlhpc-x"
    # the signal goes to the batch shell, which forwards it (and requeues if the tasks cannot answer)
    assert o["signal"] == "B:USR1@300" and o["requeue"] is False and o["reservation"] == "rl"
    assert o["open_mode"] == "append" and o["output"] == f"{tmp_path}/jobs/slurm-%j.out"
    assert fallback_s(300) == 290 and fallback_s(10) == 5
    # no grace, no signal: the run stops by its own plan before the time limit
    assert sbatch_options(SlurmConfig(time="60", signal_grace_s=0), tmp_path, "x")["signal"] is None


def test_no_time_limit_means_the_partitions_default(tmp_path: Path) -> None:
    # submitit would otherwise ask for 5 minutes
    assert sbatch_options(SlurmConfig(), tmp_path, "x")["time"] is None
    out = subprocess.run([RLHPC, "submit", str(CONFIGS / "tiny_cpu.toml"), "--dry-run"], capture_output=True,
                         text=True, check=True).stdout
    assert "--time" not in out and "#SBATCH --nodes=1" in out


def test_the_batch_shell_forwards_the_signal_and_keeps_the_step_status(tmp_path: Path) -> None:
    """The script's own shell logic, run by bash outside Slurm: a signal interrupts the shell's wait without
    losing the step's exit status, reaches the step, and a step that ignores it gets the fallback requeue."""
    from rlhpc.config import load_config
    from rlhpc.render import render

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun runs its command here; scontrol notes what it was asked
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do [[ $1 == --output || $1 == --error ]] '
                                  '&& shift; shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIGS / "tiny_cpu.toml", [f"run.output_dir='{run_dir}'", "slurm.signal_grace_s=4"])
    script = render(cfg)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}

    def run_with_step(step: str) -> tuple[subprocess.Popen, float]:
        body = script.replace(f"{shlex.quote(sys.executable)} -u -m rlhpc.job {shlex.quote(str(run_dir))}", step)
        proc = subprocess.Popen(["bash", "-c", body], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(1.0)  # the step is running
        proc.send_signal(signal.SIGUSR2)
        return proc, time.monotonic()

    # the sleep's output is not the shell's: orphaned by the trap's exit, it would hold the pipe read below open
    answers, _ = run_with_step("""bash -c 'trap "exit 7" USR2; sleep 30 >/dev/null 2>&1 & wait'""")
    assert answers.wait(timeout=10) == 7 and "SIGUSR2: the run stops" in answers.stderr.read()
    assert not (tmp_path / "scontrol.log").exists()

    stuck, signalled = run_with_step("""bash -c 'trap "" USR2; sleep 30'""")
    deadline = signalled + 30
    while not (tmp_path / "scontrol.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() - signalled >= fallback_s(4)
    stuck.kill()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    record = json.loads((run_dir / "jobs" / "42" / "attempt-0" / "interrupted.json").read_text())
    assert record["requeued"] and record["stopped_at"] is None
    assert "had not stopped 2s after SIGUSR2" in record["reason"]


def test_without_slurm_submit_runs_through_the_local_executor(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No controller: an empty config fails at once (a missing one makes Slurm look for one in DNS, a minute).
    (tmp_path / "empty-slurm.conf").write_text("")
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "empty-slurm.conf")}
    done = subprocess.run([RLHPC, "submit", str(CONFIGS / "tiny_cpu.toml"), "--wait",
                           "--set", f"ckpt.hf_checkpoint='{tiny_model_dir}'", "--set", "rollout.num_rollout=2",
                           "--set", "rollout.n_samples_per_prompt=8", "--set", "eval.eval_interval=5",
                           "--set", f"run.output_dir='{run_dir}'"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no Slurm reachable here" in done.stdout and "finished: 2 rollouts" in done.stdout
    [sub] = [json.loads(line) for line in (run_dir / "submissions.jsonl").read_text().splitlines()]
    assert sub["executor"] == "local"
    assert (run_dir / "jobs" / sub["job_id"] / "attempt-0" / "result.json").exists()
    assert not (run_dir / "jobs" / "%j").exists()
    status = subprocess.run([RLHPC, "status", str(run_dir), "--json"], capture_output=True, text=True, env=env)
    [row] = json.loads(status.stdout)
    assert (row["state"], row["rollout"], row["executor"]) == ("COMPLETED", 2, "local")
    # a run that ended is taken up again from its frozen config and latest checkpoint, here for one more rollout
    resumed = subprocess.run([RLHPC, "resume", str(run_dir), "--wait", "--set", "rollout.num_rollout=3"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    first, second = [json.loads(line)["job_id"] for line in (run_dir / "submissions.jsonl").read_text().splitlines()]
    assert json.loads((run_dir / "jobs" / second / "attempt-0" / "start.json").read_text())["resumed_from"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == [0, 1, 2]
