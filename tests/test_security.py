"""Hostile or careless input (issue #21, security): nothing from a config, a command line or a run folder runs a
command, signals a process or reads a file it was not meant to."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MINIMAL
from rlhpc.cli import app
from rlhpc.config import ConfigError, load_config

runner = CliRunner()


def problems_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("table, field", [
    ('[slurm.additional_parameters]\n"reservation=rl\\ntouch /tmp/pwned #" = "x"\n', "slurm.additional_parameters"),
    ('[slurm.additional_parameters]\n"--gres" = "gpu:1"\n', "slurm.additional_parameters"),
    ('[slurm.additional_parameters]\nreservation = "rl\\ntouch /tmp/pwned"\n', "slurm.additional_parameters"),
    ('[slurm.env]\n"A;touch /tmp/pwned;B" = "1"\n', "slurm.env"),
    ('[slurm.env]\nTOKEN = "x\\ntouch /tmp/pwned"\n', "slurm.env"),
    ('[slurm]\npartition = "gpu\\ntouch /tmp/pwned"\n', "slurm.partition"),
    ('[run]\noutput_dir = "runs/x\\ntouch /tmp/pwned"\n', "run.output_dir"),
])
def test_what_could_put_a_command_into_the_batch_script_is_refused_by_validate(write_config, table, field):
    path = write_config(MINIMAL + table)
    assert field in problems_of(path)
    result = runner.invoke(app, ["validate", str(path)], terminal_width=400)
    assert result.exit_code == 2 and field in result.output


def test_sbatch_option_names_that_slurm_knows_still_pass(write_config):
    cfg = load_config(write_config(MINIMAL + '[slurm.additional_parameters]\nreservation = "rl"\n'
                                   'mail-type = "END"\ngres = "gpu:8"\nhint = "nomultithread"\n'))
    assert cfg.slurm.additional_parameters["mail-type"] == "END"


def test_render_refuses_an_output_path_that_would_end_the_header_comment(write_config, tmp_path):
    path = write_config(MINIMAL + f'[run]\noutput_dir = "{tmp_path / "run"}"\n')
    result = runner.invoke(app, ["render", str(path), "-o", str(tmp_path / "x\ntouch pwned")], terminal_width=400)
    assert result.exit_code == 2 and "--output" in result.output and "control character" in result.output
    assert not (tmp_path / "x\ntouch pwned").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/x", "http:/no-host", "localhost:8000/reward"])
def test_reward_urls_are_http_or_https(write_config, url):
    path = write_config(MINIMAL.replace('rm_type = "math"', f'rm_type = "remote_rm"\nrm_url = "{url}"'))
    assert "rollout.rm_url" in problems_of(path)


def test_an_https_reward_url_is_accepted(write_config):
    path = write_config(MINIMAL.replace('rm_type = "math"', 'rm_type = "remote_rm"\nrm_url = "HTTPS://rm:8000/r"'))
    assert load_config(path).rollout.rm_url == "HTTPS://rm:8000/r"


class StatusServer:
    """A reward server on loopback that answers every request with `status` (and no reward)."""

    def __init__(self, status: int):
        self.seen = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/reward"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


PAYLOAD = {"prompt": "", "response": "", "label": ""}


def test_a_reward_servers_refusal_is_not_retried_like_an_outage():
    from rl.rewards.remote import RemoteRewardError, remote_reward

    with StatusServer(422) as server:
        with pytest.raises(RemoteRewardError, match="refused the request: HTTP 422"):
            asyncio.run(remote_reward(server.url, PAYLOAD, max_retries=3, backoff_s=0.01))
        assert server.seen == 1
    with StatusServer(429) as server:  # too many requests: later may work
        with pytest.raises(RemoteRewardError, match="still failing after 4 attempts"):
            asyncio.run(remote_reward(server.url, PAYLOAD, max_retries=3, backoff_s=0.01))
        assert server.seen == 4


def test_a_samples_remote_reward_has_an_overall_deadline():
    from rl.rewards.remote import RemoteRewardError, remote_reward

    with StatusServer(503) as server:
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match="deadline"):
            asyncio.run(remote_reward(server.url, PAYLOAD, max_retries=100, backoff_s=0.2, deadline_s=1.0))
        assert time.monotonic() - start < 1.5 and 2 <= server.seen < 10


def test_the_deadline_is_a_config_field(write_config):
    path = write_config(MINIMAL)
    assert load_config(path, ["rollout.rm_deadline_s=60"]).rollout.rm_deadline_s == 60
    assert "rollout.rm_deadline_s" in problems_of(path, "rollout.rm_deadline_s=0")


def test_slurm_commands_that_hang_time_out(tmp_path, monkeypatch):
    from hpc import slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scancel", "scontrol"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setattr(slurm, "SLURM_TIMEOUT_S", 0.5)
    env = {"PATH": str(bin_dir)}
    start = time.monotonic()
    with pytest.raises(OSError, match="scancel 7 did not answer"):
        slurm.cancel("7", env=env)
    with pytest.raises(OSError, match="scontrol requeue did not answer"):
        slurm.requeue("7", env=env)
    assert slurm.kill_wait_s(env) == 30  # Slurm's default, when the controller does not say
    assert time.monotonic() - start < 10


def test_the_node_loss_drill_kills_only_the_raylet_of_its_own_temp_dir():
    from rlhpc.drill import raylet_pattern

    pattern = raylet_pattern("/tmp/ray.job+1")
    lines = ["/usr/bin/raylet --temp_dir=/tmp/ray.job+1/session", "/usr/bin/raylet --temp_dir=/tmp/rayXjob1/session",
             "/usr/bin/raylet --temp_dir=/tmp/ray.job+11/session", "srun pkill -f [r]aylet.*/tmp/ray.job+1/"]
    # pkill reads its pattern as an extended regular expression, as grep -E does
    found = subprocess.run(["grep", "-E", pattern], input="\n".join(lines), capture_output=True, text=True).stdout
    assert found.splitlines() == lines[:1]



def local_run(root: Path, job_id: str, started: str | None) -> Path:
    run = root / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    entry = {"job_id": job_id, "executor": "local", "nodes": 1, "submitted_at": 0, "started": started}
    (run / "submissions.jsonl").write_text(json.dumps(entry) + "\n")
    return run


@pytest.fixture
def bystander():
    """A process that is not the run's job, and must survive `cancel`."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_cancel_leaves_alone_a_process_that_reused_the_jobs_pid(tmp_path, monkeypatch, bystander):
    run = local_run(tmp_path, str(bystander.pid), started="Mon Jan  1 00:00:00 2024")  # the job that ended
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cancel", "a"], terminal_width=400)
    assert result.exit_code == 0 and "had already ended" in result.output
    assert (run / "cancelled").exists()
    time.sleep(0.2)
    assert bystander.poll() is None


def test_cancel_signals_nothing_it_cannot_identify(tmp_path, monkeypatch, bystander):
    run = local_run(tmp_path, str(bystander.pid), started=None)  # a run folder written before start times
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cancel", "a"], terminal_width=400)
    assert result.exit_code == 1 and "nothing was signalled" in result.output
    time.sleep(0.2)
    assert bystander.poll() is None
    assert (run / "cancelled").exists()  # the mark still stops any later resume


@pytest.mark.parametrize("job_id", ["-1", "0", "1", "x12", ""])
def test_cancel_refuses_a_local_job_id_that_is_no_process_of_its_own(tmp_path, monkeypatch, job_id):
    signalled = []
    # kill(-1) would reach every process of the user (of the machine, as root): never for real in a test
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append(pid))
    run = local_run(tmp_path, job_id, started=None)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cancel", "a"], terminal_width=400)
    assert result.exit_code == 2
    assert "is not the process id of a local job" in result.output and len(result.output.splitlines()) == 1
    assert not (run / "cancelled").exists() and signalled == []


def test_the_run_folder_and_what_holds_slurm_env_are_private(write_config, tmp_path):
    run_dir, script = tmp_path / "run", tmp_path / "job.sbatch"
    script.write_text("an older script\n")
    script.chmod(0o644)
    path = write_config(MINIMAL + f'[run]\noutput_dir = "{run_dir}"\n[slurm.env]\nHF_TOKEN = "hf_secret"\n')
    result = runner.invoke(app, ["render", str(path), "-o", str(script)], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "hf_secret" in script.read_text() and "hf_secret" in (run_dir / "config.toml").read_text()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "config.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE(script.stat().st_mode) == 0o600


def test_the_wandb_key_is_in_no_file_rlhpc_writes_and_no_message(write_config, tmp_path):
    """Unlike [slurm.env], run.wandb_key stays out of config.toml and the batch script (copied into bug reports
    and shared): rl.wandb_run hands it to W&B in memory."""
    run_dir, script = tmp_path / "run", tmp_path / "job.sbatch"
    path = write_config(MINIMAL + f'[run]\noutput_dir = "{run_dir}"\nuse_wandb = true\nwandb_key = "wk-secret"\n')
    for command in (["render", str(path), "-o", str(script)], ["config", "show", str(path)], ["validate", str(path)]):
        result = runner.invoke(app, command, terminal_width=400)
        assert result.exit_code == 0 and "wk-secret" not in result.output, result.output
    assert "wk-secret" not in script.read_text() + (run_dir / "config.toml").read_text()
    # the job, which reads the frozen config, finds it beside it, readable by its owner only
    key = run_dir / "wandb-key"
    assert key.read_text().strip() == "wk-secret" and key.stat().st_mode & 0o777 == 0o600
    cfg = load_config(path)
    assert cfg.run.wandb_key.get_secret_value() == "wk-secret" and "wk-secret" not in repr(cfg)
    problems = problems_of(path, "run.use_wandb=false")  # pydantic's own message would quote the input
    assert "run.wandb_key" in problems and "wk-secret" not in problems


class Trap:
    """Unpickled, it creates a file: what a hostile checkpoint file would do with a command instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoints_random_state_is_loaded_without_running_code(tmp_path):
    import random

    import torch

    from rl import checkpoint

    random.seed(3)
    torch.manual_seed(3)
    checkpoint.save_rng(tmp_path, rank=0)
    expected = (random.random(), torch.rand(2))
    random.seed(4)
    torch.manual_seed(4)
    assert checkpoint.load_rng(tmp_path, rank=0)
    assert (random.random(), *torch.rand(2).tolist()) == (expected[0], *expected[1].tolist())

    marker = tmp_path / "code-ran"
    torch.save({"torch": torch.get_rng_state(), "python": Trap(marker)}, checkpoint.rng_file(tmp_path, 0))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_rng(tmp_path, rank=0)
    assert not marker.exists()


def test_status_reads_no_pickle_from_a_run_folder(tmp_path):
    from rlhpc.status import collect

    run = tmp_path / "a"
    (run / "jobs" / "7" / "attempt-0").mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "submissions.jsonl").write_text(json.dumps({"job_id": "7", "executor": "slurm", "nodes": 1,
                                                       "submitted_at": 0}) + "\n")
    marker = tmp_path / "code-ran"
    (run / "jobs" / "7" / "7_0_result.pkl").write_bytes(pickle.dumps(("success", Trap(marker))))
    [row] = collect([run], env={"PATH": ""})  # no squeue: the state comes from the folder
    assert not marker.exists() and row.state == "ENDED"
    (run / "jobs" / "7" / "attempt-0" / "failed.json").write_text('{"error": "ValueError: x"}')
    assert collect([run], env={"PATH": ""})[0].state == "FAILED"


def test_a_job_that_fails_says_so_in_json(write_config, tmp_path):
    from rlhpc.config import load_config
    from rlhpc.run_folder import freeze
    from rlhpc.status import collect

    run_dir = freeze(load_config(write_config(MINIMAL + f'[run]\noutput_dir = "{tmp_path / "run"}"\n')))
    failing = ("import contextlib, sys\nimport rlhpc.job as job\n"
               "@contextlib.contextmanager\ndef no_ray(*args, **kwargs):\n"
               "    raise ValueError('no Ray here')\n    yield\n"
               "job.ray_cluster = no_ray\njob.run_job(sys.argv[1])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SUBMITIT_LOCAL_JOB_ID": "123"}
    p = subprocess.run([sys.executable, "-c", failing, str(run_dir)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode != 0 and "no Ray here" in p.stderr
    failed = json.loads((run_dir / "jobs" / "123" / "attempt-0" / "failed.json").read_text())
    assert failed["error"] == "ValueError: no Ray here"
    assert collect([run_dir], env={"PATH": ""})[0].state == "FAILED"


def test_a_checkpoints_index_is_read_without_running_code(tmp_path):
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from rl import checkpoint

    weights = {"w": torch.arange(4.0), "step": 3, "extra": {"path": Path("/x"), "dtype": "bf16"}}
    checkpoint.save_model_state(weights, tmp_path)
    loaded = {"w": torch.zeros(4), "step": 0, "extra": {"path": Path(), "dtype": ""}}
    checkpoint.load_model_state(loaded, tmp_path)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["step"] == 3 and loaded["extra"]["path"] == Path("/x")

    marker = tmp_path / "code-ran"
    (tmp_path / "model" / ".metadata").write_bytes(pickle.dumps(Trap(marker)))
    with pytest.raises(CheckpointException, match="index names pathlib.Path.touch"):
        checkpoint.load_model_state(loaded, tmp_path)
    assert not marker.exists()
