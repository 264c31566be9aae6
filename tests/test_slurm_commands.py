"""The Slurm commands of hpc/slurm.py run as they always did, with the arguments the rest of rlhpc relied on,
and none waits past its timeout. Stand-ins on PATH say what they were called with; no Slurm is needed."""

import shutil
import subprocess
import time

import pytest

from hpc import slurm

ECHO = '#!/bin/sh\nprintf "%s\\n" "${0##*/}" "$@"\n'


def stand_ins(tmp_path, script, tools=("sbatch", "scancel", "scontrol", "sinfo", "srun")):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text(script)
        (bin_dir / tool).chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_each_command_runs_with_its_arguments(tmp_path):
    env = stand_ins(tmp_path, ECHO)

    def argv(p):
        assert p.returncode == 0
        return p.stdout.splitlines()

    assert argv(slurm.sbatch("--parsable", "--wrap=sleep 5", env=env)) == ["sbatch", "--parsable", "--wrap=sleep 5"]
    assert argv(slurm.signal_batch_shell("7", "USR1", env)) == ["scancel", "--batch", "--signal=USR1", "7"]
    assert argv(slurm.run_on_node("7", "node2", "pkill", "-f", "[r]aylet", env=env)) == [
        "srun", "--jobid=7", "--overlap", "--nodes=1", "--ntasks=1", "--nodelist=node2", "pkill", "-f", "[r]aylet"]
    assert argv(slurm.show_config(env)) == ["scontrol", "show", "config"]
    assert argv(slurm.show_partitions(env)) == ["scontrol", "show", "partition", "-o"]
    assert slurm.expand_hostlist("gpu[01-02]", env) == ["scontrol", "show", "hostnames", "gpu[01-02]"]


def test_version_and_the_reachability_probe_use_sinfo(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", stand_ins(tmp_path, ECHO)["PATH"])
    assert slurm.version().stdout.splitlines() == ["sinfo", "-V"]
    assert slurm.controller_answers(timeout_s=10)


def test_node_addresses_and_states_are_read_from_scontrol_and_sinfo(tmp_path):
    env = stand_ins(tmp_path, "#!/bin/sh\n"
                    'case "${0##*/}" in\n'
                    "  scontrol) echo 'NodeName=node1 Arch=x86_64 NodeAddr=10.87.0.11 State=IDLE'\n"
                    "            echo 'NodeName=node2 State=IDLE' ;;\n"
                    "  sinfo) echo 'node1 idle'; echo 'node2 down*' ;;\n"
                    "esac\n")
    assert slurm.node_addresses(["node1", "node2"], env) == {"node1": "10.87.0.11", "node2": "node2"}
    assert slurm.node_states(env) == {"node1": "idle", "node2": "down*"}


def test_commands_that_fail_say_so_as_before(tmp_path, monkeypatch):
    env = stand_ins(tmp_path, "#!/bin/sh\necho 'Invalid hostlist' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(subprocess.CalledProcessError):
        slurm.expand_hostlist("gpu[", env)
    assert slurm.node_states(env) == {}
    assert not slurm.controller_answers()


def test_commands_that_hang_time_out(tmp_path, monkeypatch):
    env = stand_ins(tmp_path, f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    monkeypatch.setattr(slurm, "SLURM_TIMEOUT_S", 0.5)
    monkeypatch.setenv("PATH", env["PATH"])
    start = time.monotonic()
    with pytest.raises(OSError, match="scontrol show did not answer within 0.5s"):
        slurm.expand_hostlist("gpu[01-02]", env)
    with pytest.raises(OSError, match="scontrol show did not answer"):
        slurm.node_addresses(["node1"], env)
    with pytest.raises(OSError, match="sinfo -h did not answer"):
        slurm.node_states(env)
    with pytest.raises(OSError, match="srun --jobid=7 did not answer within 0.2s"):
        slurm.run_on_node("7", "node2", "true", env=env, timeout_s=0.2)
    assert not slurm.controller_answers(timeout_s=0.2)
    assert time.monotonic() - start < 10
