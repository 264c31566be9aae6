from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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
SHAPE = ["--nodes", "2", "--cpus-per-node", "2", *(["--accounting"] if ACCOUNTING else []), "--state-dir", str(STATE)]


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


def wait_gone(job_id: str, env: dict[str, str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
        if q.stdout.strip() in {"", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            return
        time.sleep(1)
    raise TimeoutError(job_id)
