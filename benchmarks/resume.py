"""Resume cost on the local cluster: the time from a job's start to its first training step, for a fresh start
and for a requeued attempt of the same run, and the work redone (rollouts since the last checkpoint).

    sudo .venv/bin/rlhpc cluster up --nodes 2 --cpus-per-node 2
    SLURM_CONF=/tmp/rlhpc-cluster/slurm.conf .venv/bin/python benchmarks/resume.py --repeats 2
    SLURM_CONF=/tmp/rlhpc-cluster/slurm.conf .venv/bin/python benchmarks/resume.py --repeats 1 --shape 0.6b

The tiny run (configs/tiny_cpu.toml, a checkpoint every 2 rollouts) is interrupted while training rollout 3,
once by the time-limit signal (checkpoint where it stops, then requeue) and once by `scontrol requeue` (killed
at once). Times are from Slurm's StartTime (1 s resolution) to the driver's first "train" phase
(`progress.json`), so they include srun, Python start-up, Ray and the actors, and for a resume the loading of
the checkpoint. Slurm's requeue delay (BeginTime) is skipped by releasing the job, as `rlhpc drill --wait` does.

`--shape 0.6b`: the same run with a Qwen3-0.6B-shaped policy (random weights, `benchmarks/shapes.py`; fp32 weights
and AdamW state, a 7.8 GB checkpoint) and a small batch, so that a resume reads a checkpoint of real size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import QWEN3, build_model  # noqa: E402
from hpc.slurm import TERMINAL, queue  # noqa: E402
from rl.tiny_model import build_tiny_model  # noqa: E402
from rlhpc.drill import drill, wait_for_phase, wait_resumed  # noqa: E402

RLHPC = str(Path(sys.executable).with_name("rlhpc"))
INTERRUPT_AT = 3
REAL_SIZE = ["rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=2", "rollout.num_steps_per_rollout=1",
             "grpo.use_kl_loss=false", "slurm.signal_grace_s=600", "ckpt.keep_last=1"]
"""A batch that keeps a 0.6B policy's rollouts short on 2 CPUs (no reference model: memory), a grace that covers
its save, and one checkpoint kept (the run folder is removed after; each is 7.8 GB)."""


def wait_running(job_id: str, min_restarts: int, timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        [info] = queue([job_id]) or [None]
        if info is not None and info.state == "RUNNING" and info.restarts >= min_restarts and info.start_time:
            return info.start_time
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not start")


def wait_gone(job_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(j.state not in TERMINAL for j in queue([job_id])):
        time.sleep(0.5)


def one(model_dir: Path, kind: str, settings: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"resume-{kind}-", dir=ROOT / "runs"))
    sets = [f"ckpt.hf_checkpoint='{model_dir}'", f"run.output_dir='{run_dir}'", "rollout.num_rollout=6",
            "ckpt.save_interval=2", "eval.eval_interval=1000", "slurm.signal_grace_s=30", *settings]
    subprocess.run([RLHPC, "submit", str(ROOT / "configs" / "tiny_cpu.toml"), "--nodes", "1", "--cpus-per-task", "2",
                    *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True)
    job = json.loads((run_dir / "submissions.jsonl").read_text().splitlines()[-1])["job_id"]
    started = wait_running(job, 0)
    fresh = wait_for_phase(run_dir, "train", started, 600, rollout=0)["time"] - started
    wait_for_phase(run_dir, "train", started, 600, rollout=INTERRUPT_AT)
    drill(run_dir, "requeue" if kind == "requeue" else "timeout", signal="USR2")
    record = wait_resumed(run_dir, job, 0, timeout_s=600)
    restarted = wait_running(job, 1)
    resumed = wait_for_phase(run_dir, "train", restarted, 600)["time"] - restarted
    subprocess.run(["scancel", job], capture_output=True)
    if settings:
        wait_gone(job)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"kind": kind, "fresh_s": fresh, "resumed_s": resumed, "resumed_from": record["resumed_from"],
            "redone": record["redone"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shape", choices=["tiny", *QWEN3], default="tiny")
    args = ap.parse_args()
    if "SLURM_CONF" not in os.environ:
        sys.exit("set SLURM_CONF to the local cluster's slurm.conf (see the docstring)")
    (ROOT / "runs").mkdir(exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="resume-model-", dir=ROOT / "runs")) / args.shape
    if args.shape == "tiny":
        build_tiny_model(model_dir)
    else:
        build_model(model_dir, args.shape)
    settings = [] if args.shape == "tiny" else REAL_SIZE
    print("| interruption | fresh start → first step (s) | requeued start → first step (s) | resumed from | "
          "rollouts redone |")
    print("|---|---|---|---|---|")
    for kind in ("signal", "requeue"):
        runs = [one(model_dir, kind, settings) for _ in range(args.repeats)]
        print(json.dumps(runs), file=sys.stderr)
        label = "time-limit signal (USR2)" if kind == "signal" else "scontrol requeue (no signal)"
        print(f"| {label} | {statistics.median(r['fresh_s'] for r in runs):.1f} | "
              f"{statistics.median(r['resumed_s'] for r in runs):.1f} | "
              f"{', '.join(str(r['resumed_from']) for r in runs)} | {', '.join(str(r['redone']) for r in runs)} |",
              flush=True)


if __name__ == "__main__":
    main()
