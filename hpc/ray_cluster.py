"""Ray inside a Slurm allocation: one Ray node per Slurm node, the head on rank 0.

Every task of the job calls `ray_cluster(...)`. Rank 0 starts the head on its address on the interface that
routes to the other nodes and publishes that address in the attempt's folder (shared filesystem); the other
ranks wait for it, start a worker node against it, then stay until rank 0 marks the attempt done. Rank 0
returns once every node has joined the GCS with its CPUs and GPUs, detected by polling the GCS, never by
sleeping a fixed time; a node that has not joined within `join_timeout_s` ends the job with an error naming it.
Every rank stops exactly the Ray processes it started (never a global `ray stop`, which kills other users'
Ray on shared nodes), whatever the outcome.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc import stacks
from hpc.allocation import Allocation
from hpc.network import Route, address_of, job_env, route_to
from hpc.processes import processes
from hpc.slurm import node_addresses
from hpc.wait import port_open, until

if TYPE_CHECKING:
    from hpc.config import RayConfig

log = logging.getLogger("rlhpc.ray")

# Ray's longest AF_UNIX path below its temp dir: "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store".
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107
_MIN_OBJECT_STORE = 80 * 2**20  # Ray refuses less than 75 MiB
HEAD_FILE = "ray-head.json"
TOKEN_FILE = "ray-token"
DONE_FILE = "done"
POLL_S = 0.1
START_TIMEOUT_S = 120.0
"""How long one node's `ray start` may take; the join timeout counts from the head being up."""
STOP_GRACE_S = 5.0
"""How long a stopped `ray start --block` may take to stop its children before it is killed."""
HEAD_PROBE_S = 5.0
"""How long a node whose Ray stopped waits for the head's port to answer before counting the head gone too."""


class RayStartError(RuntimeError):
    pass


class RayNodeLost(RayStartError):
    """This node's Ray stopped while the job was running. `host`: the node to blame, this one, where the head
    still answered (so the fault was here); None where the head had gone too (a raylet exits once it has lost
    the head for `RAY_gcs_rpc_server_reconnect_timeout_s`), which says nothing against this node."""

    def __init__(self, message: str, host: str | None = None):
        super().__init__(message)
        self.host = host


@dataclass(frozen=True)
class PortBlock:
    """The ports of one job's Ray, a contiguous block so that two jobs on one node never share one."""

    base: int
    SIZE = 200  # 10 fixed ports, the rest for worker processes

    def ray_args(self, *, head: bool) -> list[str]:
        b = self.base
        args = [f"--node-manager-port={b + 1}", f"--object-manager-port={b + 2}",
                f"--dashboard-agent-listen-port={b + 4}", f"--dashboard-agent-grpc-port={b + 5}",
                f"--metrics-export-port={b + 6}", f"--runtime-env-agent-port={b + 8}",
                f"--min-worker-port={b + 10}", f"--max-worker-port={b + self.SIZE - 1}",
                # unused on workers, but Ray checks its default (10001) against the others: block 0 has it
                f"--ray-client-server-port={b + 7}"]
        if head:
            args += [f"--port={b}", f"--dashboard-port={b + 3}"]
        return args


def port_block(job_number: int, *, ephemeral: tuple[int, int], fixed: int | None = None,
               low: int = 10000, high: int = 65000) -> PortBlock:
    """Job k's block: the (k mod count)-th of the blocks in [low, high) that miss the kernel's ephemeral range
    (`/proc/sys/net/ipv4/ip_local_port_range`), from which the kernel hands out ports that would clash.
    With `fixed` (the `[ray] port` of the config) the block starts there, and must miss that range too."""
    lo, hi = ephemeral
    size = PortBlock.SIZE

    def clear(base: int) -> bool:
        return base + size <= lo or base > hi

    if fixed is not None:
        if not clear(fixed) or fixed + size > 65536:
            raise RayStartError(f"ray.port = {fixed}: its block {fixed}-{fixed + size - 1} overlaps the kernel's "
                                f"ephemeral ports {lo}-{hi} or passes 65535; choose a port below {lo - size}")
        return PortBlock(fixed)
    bases = [b for b in range(low, high - size + 1, size) if clear(b)]
    if not bases:
        raise RayStartError(f"no block of {size} ports in {low}-{high} misses the ephemeral range {lo}-{hi}")
    return PortBlock(bases[job_number % len(bases)])


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    lo, hi = path.read_text().split()
    return int(lo), int(hi)


def temp_dir_for(alloc: Allocation, root: str | None) -> Path:
    """A short node-local dir per job and node: Ray's socket paths below it must stay within 107 bytes."""
    path = Path(root or "/tmp") / f"rlhpc-{alloc.job_id}-{alloc.node_rank}"
    if len(str(path)) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
        raise RayStartError(f"Ray temp dir {path} is too long: socket paths below it would pass "
                            f"{_MAX_SOCKET_PATH} bytes; set [ray] temp_dir to a short node-local path like /tmp")
    return path


def object_store_bytes(requested: int | None, *, memory: int, shm_free: int) -> tuple[int, bool]:
    """(object-store size, whether it fits in /dev/shm). Ray's default takes 30% of memory, which overflows a
    small /dev/shm (containers default to 64 MiB) and then silently spills to disk: size it against /dev/shm."""
    want = requested or int(memory * 0.3)
    room = int(shm_free * 0.9)
    if want <= room:
        return max(want, _MIN_OBJECT_STORE), room >= _MIN_OBJECT_STORE
    if requested is not None:
        raise RayStartError(f"ray.object_store_memory = {requested} bytes does not fit in /dev/shm "
                            f"({shm_free} bytes free); lower it or unset it")
    if room >= _MIN_OBJECT_STORE:
        return room, True
    return max(want, _MIN_OBJECT_STORE), False


@dataclass(frozen=True)
class RayCluster:
    address: str
    """host:port of the GCS, for `ray.init(address=...)`."""
    nodes: dict[str, str]
    """Slurm host -> the address its Ray node registered with."""


class _Node:
    """One `ray start --block` process and everything it spawned, stopped by its temp dir."""

    def __init__(self, cmd: list[str], env: dict[str, str], temp_dir: Path, log_path: Path,
                 ignore_signals: tuple[int, ...]):
        self.temp_dir = temp_dir
        # A requeued job keeps its id, hence its temp dir and ports: clear what an earlier attempt left here.
        _kill_processes_using(temp_dir)
        self.log = log_path.open("ab")
        # If this task dies before it can stop Ray (SIGKILL after scancel, or the driver aborted by Ray's own
        # signal handler), the kernel kills `ray start`, and Ray's reaper then stops the processes it spawned.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=lambda: _prepare_child(ignore_signals))

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RayStartError(f"`ray start` exited with code {self.proc.returncode}; see {self.log.name}")

    def wait_started(self, timeout_s: float) -> None:
        """Until `ray start` has brought up every process of the node: it then writes the cluster's address
        into the temp dir, just before it blocks."""

        def started() -> bool:
            self.check()
            return (self.temp_dir / "ray_current_cluster").exists()

        if not until(started, timeout_s, POLL_S):
            raise RayStartError(f"`ray start` did not finish within {timeout_s:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it stops its children), then kill whatever still runs in our temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # Ray drains for up to 30 s on SIGTERM; the job has nothing left to drain, and Slurm's KillWait
                # (30 s by default) must not run out first.
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_processes_using(self.temp_dir)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _prepare_child(ignore_signals: tuple[int, ...]) -> None:
    """In `ray start` before it runs: die with the task, and ignore the job's own signals. Slurm signals every
    process of a step, and Ray's processes (which inherit the ignored disposition) would die of USR2."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in ignore_signals:
        signal.signal(sig, signal.SIG_IGN)


def _kill_processes_using(temp_dir: Path) -> None:
    """Kill this job's stray Ray processes: those whose command line names our per-job temp dir."""
    marker = str(temp_dir)
    mine = [pid for pid, cmd in processes().items() if marker in cmd and pid != os.getpid()]
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def ray_cluster(alloc: Allocation, attempt_dir: Path, ray_cfg: RayConfig,
                extra_env: Mapping[str, str] | None = None, ignore_signals: tuple[int, ...] = (),
                stacks_dir: Path | None = None) -> Iterator[RayCluster | None]:
    """Bring Ray up on this task's node. Rank 0 yields the joined cluster; other ranks yield None once rank 0
    has marked the attempt done. `extra_env` (the run's `[slurm.env]`) wins over the node's and computed variables.
    Ray's processes ignore `ignore_signals`: those the job handles itself (Slurm sends them to every process).
    The job's Ray workers register for stack dumps into `stacks_dir`. A worker node whose Ray stops before the
    head marks the end raises RayNodeLost."""
    if "ray" in sys.modules:
        # Ray reads its authentication settings when imported; the job's token must be in place first.
        raise RayStartError("ray_cluster() must be entered before `ray` is imported in this process")
    attempt_dir.mkdir(parents=True, exist_ok=True)
    block = port_block(alloc.job_number, ephemeral=ephemeral_range(), fixed=ray_cfg.port)
    # Anyone who reaches a Ray port can run code as this user: the job's Ray takes only its own token,
    # made by rank 0 in the attempt folder (readable by the user alone) and read there by the other nodes.
    token = attempt_dir / TOKEN_FILE
    launch = functools.partial(_start_node, alloc, attempt_dir, ray_cfg, block, token, extra_env, ignore_signals)
    if alloc.node_rank == 0:
        route = _head_route(alloc, ray_cfg)
        head_address = f"{route.source}:{block.base}"
        _write_token(token)
        # Published before the head starts: the other nodes start as soon as its GCS port opens, so their
        # start-up overlaps the head's instead of following it.
        _write_json(attempt_dir / HEAD_FILE, {"address": head_address})
        node = launch(route, head_address, head=True)
        try:
            node.wait_started(START_TIMEOUT_S)
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))  # for this driver
            nodes = wait_for_nodes(head_address, alloc, attempt_dir, ray_cfg.join_timeout_s, node, stacks_dir)
            try:
                yield RayCluster(head_address, nodes)
            finally:
                # Disconnect before the cluster goes: a driver still connected when the GCS stops aborts.
                import ray

                ray.shutdown()
                (attempt_dir / DONE_FILE).touch()
        finally:
            node.stop()
    else:
        head_address = _wait_for_head(attempt_dir, alloc, START_TIMEOUT_S + ray_cfg.join_timeout_s)
        host, port = head_address.rsplit(":", 1)
        route = (Route(ray_cfg.socket_ifname, address_of(ray_cfg.socket_ifname)) if ray_cfg.socket_ifname
                 else route_to(host))
        _wait_for_port(host, int(port), START_TIMEOUT_S + ray_cfg.join_timeout_s)
        node = launch(route, head_address, head=False)
        try:
            node.wait_started(START_TIMEOUT_S)  # a failed start is an error, not a lost node
            _wait_until_done(node, attempt_dir, alloc.host, head_address)
            yield None
        finally:
            node.stop()


def _head_route(alloc: Allocation, ray_cfg: RayConfig) -> Route:
    """The interface and address the head is reached at: `[ray] socket_ifname` where set, else the route to
    another node of the job, or loopback when it is alone."""
    if ray_cfg.socket_ifname:
        return Route(ray_cfg.socket_ifname, address_of(ray_cfg.socket_ifname))
    if peers := [h for h in alloc.hosts if h != alloc.host]:
        return route_to(node_addresses(peers)[peers[0]])
    return Route("lo", "127.0.0.1")


def _start_node(alloc: Allocation, attempt_dir: Path, ray_cfg: RayConfig, block: PortBlock, token: Path,
                extra_env: Mapping[str, str] | None, ignore_signals: tuple[int, ...], route: Route,
                head_address: str, *, head: bool) -> _Node:
    """Start `ray start --block` on this node, the head or a worker joining `head_address`, and record the
    node in the attempt's folder."""
    env, shown = job_env(route, environ=os.environ, settings={**ray_cfg.network_env(), **(extra_env or {})})
    if head:
        log.info("network environment: %s", ", ".join(f"{k}={v}" for k, v in shown.items()))
    temp_dir = temp_dir_for(alloc, ray_cfg.temp_dir)
    shm = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else 0
    store, in_shm = object_store_bytes(ray_cfg.object_store_memory, memory=alloc.memory_bytes, shm_free=shm)
    if not in_shm:
        log.warning("/dev/shm has %d MiB free: Ray's object store goes to %s (slower)", shm >> 20, temp_dir)
    # The host resource tells the head which Slurm host a Ray node is, whatever address Ray registered.
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           f"--num-cpus={alloc.cpus}", f"--num-gpus={alloc.gpus}",
           f"--resources={json.dumps({host_resource(alloc.host): 1})}",
           f"--temp-dir={temp_dir}", f"--object-store-memory={store}", *block.ray_args(head=head)]
    if route.ifname != "lo":  # alone, Ray picks its own address; with peers, the one they reach us at
        cmd.append(f"--node-ip-address={route.source}")
    if not in_shm:
        cmd.append(f"--plasma-directory={temp_dir}")
    cmd += (["--head", f"--include-dashboard={str(ray_cfg.dashboard).lower()}",
             f"--dashboard-host={ray_cfg.dashboard_host}"] if head else [f"--address={head_address}"])
    # GCS clients retry for longer: many nodes registering at once can slow the GCS (NeMo-RL's experience).
    env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "120")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    node = _Node(cmd, env, temp_dir, attempt_dir / f"ray-{alloc.host}.log", ignore_signals)
    try:
        (attempt_dir / "nodes").mkdir(exist_ok=True)
        _write_json(attempt_dir / "nodes" / f"{alloc.host}.json",
                    {"address": route.source, "ifname": route.ifname, "rank": alloc.node_rank,
                     "cpus": alloc.cpus, "gpus": alloc.gpus, "pid": os.getpid(), "temp_dir": str(temp_dir)})
    except BaseException:
        node.stop()
        raise
    return node


def host_resource(host: str) -> str:
    return f"rlhpc-host-{host}"


def _write_token(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _wait_for_head(attempt_dir: Path, alloc: Allocation, timeout_s: float) -> str:
    path = attempt_dir / HEAD_FILE
    if not until(path.exists, timeout_s, POLL_S):
        raise RayStartError(f"the Ray head ({alloc.hosts[0]}) did not start within {timeout_s:.0f}s")
    return json.loads(path.read_text())["address"]


def _wait_for_port(host: str, port: int, timeout_s: float) -> None:
    if not until(lambda: port_open(host, port), timeout_s, POLL_S):
        raise RayStartError(f"the Ray head did not listen on {host}:{port} within {timeout_s:.0f}s")


def lost_hosts(alloc: Allocation) -> list[str]:
    """Hosts of the allocation without an alive Ray node (none before this process is connected)."""
    if "ray" not in sys.modules:  # importing it here, before ray_cluster(), would miss the job's token
        return []
    import ray

    if not ray.is_initialized():
        return []
    alive = {h for n in ray.nodes() if n["Alive"] for h in alloc.hosts if host_resource(h) in n["Resources"]}
    return [h for h in alloc.hosts if h not in alive]


def wait_for_nodes(address: str, alloc: Allocation, attempt_dir: Path, timeout_s: float, node: _Node,
                   stacks_dir: Path | None = None) -> dict[str, str]:
    """Poll the GCS until one alive Ray node per Slurm host has registered with the task's CPUs and GPUs."""
    import ray

    # Every worker of the job can be asked for its stacks (hpc.stacks).
    runtime_env = {"worker_process_setup_hook": stacks.SETUP_HOOK,
                   "env_vars": {stacks.ENV: str(stacks_dir)}} if stacks_dir else None
    ray.init(address=address, configure_logging=False, log_to_driver=True, namespace="rlhpc",
             runtime_env=runtime_env)
    deadline = time.monotonic() + timeout_s
    while True:
        node.check()
        hosts = {}
        for n in ray.nodes():
            res = n["Resources"]
            host = next((h for h in alloc.hosts if host_resource(h) in res), None)
            path = attempt_dir / "nodes" / f"{host}.json"
            if n["Alive"] and host and path.exists():
                info = json.loads(path.read_text())
                if res.get("CPU", 0) >= info["cpus"] and res.get("GPU", 0) >= info["gpus"]:
                    hosts[host] = n["NodeManagerAddress"]
        if len(hosts) == alloc.num_nodes:
            return hosts
        if time.monotonic() > deadline:
            missing = [h for h in alloc.hosts if h not in hosts]
            ray.shutdown()
            raise RayStartError(f"{len(missing)} of {alloc.num_nodes} nodes did not join Ray within "
                                f"{timeout_s:.0f}s: {', '.join(missing)}")
        time.sleep(POLL_S)


def _wait_until_done(node: _Node, attempt_dir: Path, host: str, head_address: str) -> None:
    done = attempt_dir / DONE_FILE

    def finished() -> bool:
        if done.exists():
            return True
        try:
            node.check()
        except RayStartError as e:
            if done.exists():  # the head went first, as it does at the end of every job
                return True
            address, port = head_address.rsplit(":", 1)
            head_up = port_open(address, int(port), timeout_s=HEAD_PROBE_S)
            raise RayNodeLost(f"Ray on {host} stopped while the run was going ({e})"
                              + ("" if head_up else f"; the head at {head_address} is gone too"),
                              host if head_up else None) from None
        return False

    until(finished, float("inf"), POLL_S)
