"""Ray bring-up inside an allocation: port blocks, temp dir, object store, and a real bring-up/teardown."""

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.allocation import Allocation
from hpc.processes import processes
from hpc.ray_cluster import (
    PortBlock,
    RayNodeLost,
    RayStartError,
    object_store_bytes,
    port_block,
    temp_dir_for,
)

MiB = 2**20


def test_port_blocks_avoid_the_ephemeral_range_and_differ_between_jobs() -> None:
    ephemeral = (32768, 60999)
    blocks = {port_block(job, ephemeral=ephemeral).base for job in range(1000, 1100)}
    assert len(blocks) == 100
    for base in blocks:
        assert base + PortBlock.SIZE <= 32768 or base > 60999
        assert 1024 < base and base + PortBlock.SIZE <= 65536


def test_port_blocks_with_a_wide_ephemeral_range() -> None:
    base = port_block(7, ephemeral=(15000, 65000)).base
    assert base + PortBlock.SIZE <= 15000


def test_fixed_port_inside_the_ephemeral_range_is_refused() -> None:
    assert port_block(1, ephemeral=(32768, 60999), fixed=20000).base == 20000
    with pytest.raises(RayStartError, match="ephemeral"):
        port_block(1, ephemeral=(32768, 60999), fixed=40000)


def test_ray_args_use_the_block() -> None:
    args = PortBlock(20000).ray_args(head=True)
    assert "--port=20000" in args and "--max-worker-port=20199" in args
    worker = PortBlock(10000).ray_args(head=False)
    assert not any(a.startswith("--port") for a in worker)
    # every port of a worker node inside the block, Ray's default client-server port (10001) included
    ports = [int(a.split("=")[1]) for a in worker]
    assert all(10000 <= p < 10200 for p in ports) and "--ray-client-server-port=10007" in worker
    assert len(set(ports)) == len(ports)


def alloc(job_id: str = "123", hosts: tuple[str, ...] = ("n1",), cpus: int = 1) -> Allocation:
    return Allocation(job_id, 0, hosts, cpus, 0, 8 << 30)


def test_temp_dir_is_short_and_per_job_and_node() -> None:
    assert temp_dir_for(alloc(), None) == Path("/tmp/rlhpc-123-0")
    with pytest.raises(RayStartError, match="too long"):
        temp_dir_for(alloc(), "/scratch/slurm_tmpdir/job_123456789/a/very/deep/site/specific/folder")


def test_object_store_fits_dev_shm() -> None:
    # plenty of /dev/shm: 30% of memory
    assert object_store_bytes(None, memory=10_000 * MiB, shm_free=64_000 * MiB) == (3000 * MiB, True)
    # small /dev/shm: what fits
    assert object_store_bytes(None, memory=10_000 * MiB, shm_free=1000 * MiB) == (900 * MiB, True)
    # a container's 64 MiB /dev/shm: the store goes to disk
    assert object_store_bytes(None, memory=10_000 * MiB, shm_free=64 * MiB) == (3000 * MiB, False)
    with pytest.raises(RayStartError, match="does not fit"):
        object_store_bytes(2000 * MiB, memory=10_000 * MiB, shm_free=1000 * MiB)


def job_processes(marker: str) -> list[int]:
    return [pid for pid, cmd in processes().items() if marker in cmd]


BRING_UP = """
import json, sys
from pathlib import Path
from hpc.allocation import Allocation
from hpc.config import RayConfig
from hpc.ray_cluster import RayStartError, ray_cluster
import ray_probe

a = Allocation(*json.loads(sys.argv[1]))
try:
    with ray_cluster(a, Path(sys.argv[2]), RayConfig(**json.loads(sys.argv[3]))) as cluster:
        print(json.dumps(ray_probe.probe(cluster)))
except RayStartError as e:
    print(json.dumps({"error": str(e)}))
"""


def bring_up(tmp_path: Path, a: Allocation, **ray_cfg: object) -> dict:
    """Run `ray_cluster` in a fresh process, as every task of a job does (Ray not yet imported there)."""
    (tmp_path / "ray_probe.py").write_text(
        "def probe(cluster):\n"
        "    import ray\n"
        "    return {'nodes': cluster.nodes, 'cpus': ray.cluster_resources()['CPU'],\n"
        "            'running': bool(ray.get(ray.remote(lambda: 1).remote()))}\n")
    args = [json.dumps([a.job_id, a.node_rank, a.hosts, a.cpus, a.gpus, a.memory_bytes]),
            str(tmp_path / "attempt"), json.dumps(ray_cfg)]
    p = subprocess.run([sys.executable, "-c", BRING_UP, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


class _Stopped:
    """A node whose `ray start` has exited."""

    def check(self) -> None:
        raise RayStartError("`ray start` exited with code 1")


def test_a_node_whose_ray_stops_blames_itself_only_while_the_head_answers(tmp_path: Path) -> None:
    from hpc.ray_cluster import _wait_until_done

    with socket.socket() as head:  # the head's port, still answering
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        with pytest.raises(RayNodeLost, match="Ray on node2 stopped") as lost:
            _wait_until_done(_Stopped(), tmp_path, "node2", address)
        assert lost.value.host == "node2"
    # the head gone too: its raylet left because the head did, which says nothing against this node
    with pytest.raises(RayNodeLost, match="the head at 127.0.0.1:.* is gone too") as lost:
        _wait_until_done(_Stopped(), tmp_path, "node2", address)
    assert lost.value.host is None
    (tmp_path / "done").touch()  # the head marked the end first: not lost at all
    _wait_until_done(_Stopped(), tmp_path, "node2", address)


def test_single_node_bring_up_and_scoped_teardown(tmp_path: Path) -> None:
    a = alloc(job_id=f"t{os.getpid()}", hosts=(socket.gethostname(),), cpus=1)
    seen = bring_up(tmp_path, a, join_timeout_s=60)
    assert (list(seen["nodes"]), seen["cpus"], seen["running"]) == ([socket.gethostname()], 1.0, True)
    # the node's address is one of this machine's: binding to it works only here
    with socket.socket() as s:
        s.bind((str(ipaddress.ip_address(seen["nodes"][socket.gethostname()])), 0))
    assert (tmp_path / "attempt" / "done").exists()
    temp = str(temp_dir_for(a, None))
    assert job_processes(temp) == []
    assert not Path(temp).exists()


def test_missing_node_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    a = Allocation(f"m{os.getpid()}", 0, (socket.gethostname(), "ghost-node-7"), 1, 0, 8 << 30)
    seen = bring_up(tmp_path, a, join_timeout_s=3, socket_ifname="lo")
    assert seen["error"] == "1 of 2 nodes did not join Ray within 3s: ghost-node-7"
    assert job_processes(str(temp_dir_for(a, None))) == []
