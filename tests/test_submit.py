"""`rlhpc submit` without a cluster: the sbatch options it would use, and the local executor fallback."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS
from hpc.config import SlurmConfig
from rlhpc.submit import sbatch_parameters

RLHPC = str(Path(sys.executable).with_name("rlhpc"))


def test_sbatch_parameters_follow_the_slurm_section() -> None:
    p = sbatch_parameters(SlurmConfig(nodes=4, partition="gpu", time="2-00:00:00", gpus_per_node=8, exclusive=True,
                                      mem="0", signal="USR1", signal_grace_s=300,
                                      additional_parameters={"reservation": "rl", "requeue": False}), "rlhpc-x")
    assert p["nodes"] == 4 and p["ntasks_per_node"] == 1 and p["time"] == 2880 and p["gpus_per_node"] == 8
    assert p["exclusive"] is True and p["mem"] == "0" and p["job_name"] == "rlhpc-x"
    assert p["srun_args"] == ["--kill-on-bad-exit=1"] and p["signal_delay_s"] == 300
    assert p["additional_parameters"] == {"signal": "USR1@300", "requeue": False, "reservation": "rl"}


def test_no_time_limit_means_the_partitions_default() -> None:
    # submitit would otherwise ask for 5 minutes
    assert sbatch_parameters(SlurmConfig(), "x")["time"] is None
    out = subprocess.run([RLHPC, "submit", str(CONFIGS / "tiny_cpu.toml"), "--dry-run"], capture_output=True,
                         text=True, check=True).stdout
    assert "--time" not in out and "#SBATCH --nodes=1" in out


def test_without_slurm_submit_runs_through_the_local_executor(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "no-such-slurm.conf")}  # no controller answers
    done = subprocess.run([RLHPC, "submit", str(CONFIGS / "tiny_cpu.toml"), "--wait",
                           "--set", f"ckpt.hf_checkpoint='{tiny_model_dir}'", "--set", "rollout.num_rollout=2",
                           "--set", "eval.eval_interval=5", "--set", f"run.output_dir='{run_dir}'"],
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
