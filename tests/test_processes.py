"""hpc/processes.py: the process table as pid -> command line, filtered by network namespace, and the liveness
and start time of one process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.processes import alive, process_start, processes


@pytest.fixture
def child():
    marker = f"rlhpc-test-marker-{os.getpid()}"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    yield p, marker
    p.kill()
    p.wait()


def test_every_process_is_listed_with_its_arguments_joined_by_spaces(child):
    p, marker = child
    found = processes()
    assert found[p.pid] == f"{sys.executable} -c import time; time.sleep(30) {marker} "
    assert os.getpid() in found
    assert [pid for pid, cmd in found.items() if marker in cmd] == [p.pid]


def test_a_network_namespace_keeps_only_its_own_processes(child):
    p, _ = child
    mine = processes(Path("/proc/self/ns/net"))
    assert p.pid in mine and os.getpid() in mine
    assert set(mine) <= set(processes()) | {p.pid, os.getpid()}
    assert processes(Path("/var/run/netns/rlhpc-no-such-namespace")) == {}


def test_a_zombie_is_not_alive_and_a_reaped_process_has_no_start(child):
    p, _ = child
    assert alive(p.pid) and process_start(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(p.pid) and time.monotonic() < deadline:  # killed, not yet reaped: a zombie
        time.sleep(0.01)
    assert not alive(p.pid)
    assert processes()[p.pid] == ""  # a zombie's command line is empty
    p.wait()
    assert p.pid not in processes()
    assert process_start(os.getpid()) and process_start(p.pid) is None
