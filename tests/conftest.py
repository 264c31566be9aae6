from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc import local_accounting
from hpc.local_cluster import COMMANDS, DEFAULT_STATE_DIR, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rl.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


@pytest.fixture(scope="module")
def ray_local():
    """A Ray of this machine, 2 CPUs, for one test module's loop runs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML config (with data files that exist) into tmp_path and return its path."""
    (tmp_path / "train.jsonl").write_text('{"input": "1+1=", "label": "2"}\n')
    (tmp_path / "model").mkdir(exist_ok=True)

    def write(text: str, name: str = "run.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


MINIMAL = """\
[ckpt]
hf_checkpoint = "model"

[rollout]
prompt_data = "train.jsonl"
label_key = "label"
rm_type = "math"
rollout_batch_size = 4
n_samples_per_prompt = 2
"""


# --- the real local Slurm cluster (tests marked `slurm`) -------------------------------------------------

STATE = DEFAULT_STATE_DIR  # one local cluster per machine: its bridge and namespaces have fixed names
RLHPC = [str(Path(sys.executable).with_name("rlhpc"))]
ACCOUNTING = all(shutil.which(c) for c in local_accounting.COMMANDS)
# Three nodes: a 2-node job that leaves a failed node behind runs again on the third (test_chaos).
SHAPE = ["--nodes", "3", "--cpus-per-node", "2", *(["--accounting"] if ACCOUNTING else []), "--state-dir", str(STATE)]


def rlhpc(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLHPC, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def cluster():
    """Up once for every module that needs it (test_slurm_cluster's last test takes it down and checks)."""
    if os.geteuid() != 0 or any(shutil.which(c) is None for c in COMMANDS):
        pytest.skip("needs root and the Slurm packages (apt-get install slurmctld slurmd slurm-client munge)")
    c = LocalCluster(STATE)
    up = rlhpc("cluster", "up", *SHAPE)
    assert up.returncode == 0, up.stderr
    yield c
    c.down()


SLOW_REWARD = Path(__file__).parent / "slow_reward.py"


def tiny_settings(model_dir: Path, run_dir: Path, num_rollout: int = 6, samples: int = 8) -> list[str]:
    """`rlhpc submit`'s options for the tiny run on the local cluster, on one node (a later `--nodes` wins),
    with `samples` per prompt (8: a quarter of its config's, a quarter of the time) and the slow reward."""
    rl = [f"ckpt.hf_checkpoint='{model_dir}'", f"run.output_dir='{run_dir}'", f"rollout.num_rollout={num_rollout}",
          f"rollout.n_samples_per_prompt={samples}", "ckpt.save_interval=2", "eval.eval_interval=1000",
          "perf.cpu_threads=1", "slurm.signal_grace_s=30", f"rollout.custom_rm_path='{SLOW_REWARD}:reward'"]
    return ["--nodes", "1", "--cpus-per-task", "2", *[a for s in rl for a in ("--set", s)]]


@dataclass(frozen=True)
class SlurmRun:
    run_dir: Path
    submitted: subprocess.CompletedProcess[str]
    """`rlhpc submit --wait`, done."""
    job_id: str
    leftovers: str
    """The job's Ray processes that `pgrep` found as soon as the submission returned."""


@pytest.fixture(scope="session")
def tiny_on_two_nodes(cluster, tiny_model_dir, tmp_path_factory) -> SlurmRun:
    """The tiny run on both nodes, uninterrupted, by `rlhpc submit --wait`: run once for test_slurm_cluster's
    end-to-end checks and as the outcome every run of test_chaos must end with (the node count does not change
    the result: test_chaos's failed-node test ends on two nodes as runs on one do)."""
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    done = rlhpc("submit", str(CONFIGS / "tiny_cpu.toml"), *tiny_settings(tiny_model_dir, run_dir), "--nodes", "2",
                 "--wait", env=cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = json.loads((run_dir / "submissions.jsonl").read_text().splitlines()[-1])["job_id"]
    leftovers = subprocess.run(["pgrep", "-f", f"rlhpc-{job_id}-"], capture_output=True, text=True).stdout
    return SlurmRun(run_dir, done, job_id, leftovers)


def wait_gone(job_id: str, env: dict[str, str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
        if q.stdout.strip() in {"", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            return
        time.sleep(1)
    raise TimeoutError(job_id)
