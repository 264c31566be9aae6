"""A real Slurm cluster on one machine, for tests, CI and trying rlhpc without a site.

munged, slurmctld and one slurmd per node, each node in its own network namespace with its own address on a
bridge, so that every step of a job sees a distinct host address as on a real cluster. Everything the cluster
writes lives under one state folder (absolute paths: the daemons chdir to /); its own munged socket and its own
ports keep it apart from any Slurm or munge already on the machine. Clients reach it through
`SLURM_CONF=<state>/slurm.conf`.

slurmd is started with `nsenter --net=/var/run/netns/NODE`, not `ip netns exec`, which remounts /sys and breaks
slurmd's cgroup probe. Needs root and Debian's `slurmctld slurmd slurm-client munge iproute2`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from hpc import slurm
from hpc.processes import alive, processes

DEFAULT_STATE_DIR = Path("/tmp/rlhpc-cluster")
PACKAGES = "slurmctld slurmd slurm-client munge iproute2 util-linux"
TEST_PACKAGES = "bubblewrap"
"""What the tests add on the cluster: bubblewrap, under tests/test_container.py's stand-in for Apptainer."""
COMMANDS = ("munged", "slurmctld", "slurmd", "sinfo", "scontrol", "ip", "nsenter")
BRIDGE = "rlhpcbr0"
PREFIX = "rlhpc-"
"""Of the nodes' namespaces and veth interfaces."""
CTLD_PORT = 16817
SLURMD_PORT = 16818
DBD_PORT = 16819
READY_TIMEOUT_S = 30.0

SLURM_CONF = jinja2.Template("""\
# Written by `rlhpc cluster up`; rewritten at every start. A local test cluster, not a production template.
ClusterName=rlhpc
SlurmctldHost={{ host }}({{ ctld_addr }})
SlurmctldPort={{ ctld_port }}
SlurmdPort={{ slurmd_port }}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={{ state }}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={{ state }}/ctld
SlurmdSpoolDir={{ state }}/spool/%n
SlurmctldPidFile={{ state }}/run/slurmctld.pid
SlurmdPidFile={{ state }}/run/slurmd-%n.pid
SlurmctldLogFile={{ state }}/log/slurmctld.log
SlurmdLogFile={{ state }}/log/slurmd-%n.log
# No cgroups in a container: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Nodes share the machine's cores: let slurmd accept the CPUs and memory declared below.
SlurmdParameters=config_overrides
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
JobRequeue=1
# The higher-priority partition preempts the default one; preempted jobs are requeued after a signal.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{%- if version >= (23, 2) %}
PreemptParameters=send_user_signal
{%- else %}
SlurmctldParameters=preempt_send_user_signal
{%- endif %}
JobAcctGatherType=jobacct_gather/none
{%- if accounting %}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={{ ctld_addr }}
AccountingStoragePort={{ dbd_port }}
# For auth/munge this names the munge socket of connections to slurmdbd (sacct, sacctmgr, slurmctld).
AccountingStoragePass={{ state }}/munge/munge.socket
{%- else %}
AccountingStorageType=accounting_storage/none
{%- endif %}
{% for node in nodes %}
NodeName={{ node.name }} NodeAddr={{ node.addr }} CPUs={{ cpus }} RealMemory={{ memory_mb }} State=UNKNOWN
{%- endfor %}
# GraceTime belongs to the partition of the preempted job: the time its signal handler has to checkpoint.
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={{ grace_s }}
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10
""")


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Node:
    name: str
    addr: str

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}{self.name}"[:15]


@dataclass(frozen=True)
class Spec:
    nodes: int = 2
    cpus_per_node: int = os.cpu_count() or 1
    memory_mb: int = 0
    """Memory each node declares; 0: the machine's memory divided among the nodes."""
    subnet: str = "10.87.0"
    """First three octets of the bridge's /24: the bridge is .1, node k is .(10+k)."""
    grace_s: int = 30
    accounting: bool = False

    def node_list(self) -> list[Node]:
        return [Node(f"node{k}", f"{self.subnet}.{10 + k}") for k in range(1, self.nodes + 1)]

    @property
    def ctld_addr(self) -> str:
        return f"{self.subnet}.1"


@dataclass
class LocalCluster:
    state_dir: Path = DEFAULT_STATE_DIR

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).absolute()

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment under which Slurm's commands talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def spec(self) -> Spec | None:
        path = self.state_dir / "spec.json"
        return Spec(**json.loads(path.read_text())) if path.exists() else None

    # --- up ----------------------------------------------------------------------------------------------

    def up(self, spec: Spec) -> bool:
        """Start the cluster; True if it was started, False if it was already up with this shape."""
        check_prerequisites()
        current = self.spec()
        if current is not None and self.controller_alive():
            if current != spec:
                raise ClusterError(f"a local cluster with another shape is up ({current.nodes} nodes, "
                                   f"{current.cpus_per_node} CPUs each): run `rlhpc cluster down` first")
            for node in self.failed_nodes(current):  # brought back with its jobs' state kept, as a repaired node
                self._start_slurmd(node)
            self.wait_ready(current)
            return False
        if current is None and _link_exists(BRIDGE):
            raise ClusterError(f"another local cluster is up on this machine (bridge {BRIDGE} exists): "
                               "`rlhpc cluster down` removes it whatever its state dir")
        self.down()
        try:
            self._write(spec)
            self._network(spec)
            self._start_munge()
            if spec.accounting:
                from hpc.local_accounting import start_accounting

                start_accounting(self, spec, DBD_PORT)
            self._start_slurmctld()
            for node in spec.node_list():
                self._start_slurmd(node)
            self.wait_ready(spec)
        except BaseException:
            self.down()
            raise
        return True

    def _write(self, spec: Spec) -> None:
        s = self.state_dir
        for sub in ("munge", "ctld", "run", "log", *(f"spool/{n.name}" for n in spec.node_list())):
            (s / sub).mkdir(parents=True, exist_ok=True)
        (s / "munge").chmod(0o700)
        memory = spec.memory_mb or max(1024, _machine_memory_mb() // spec.nodes)
        self.conf.write_text(SLURM_CONF.render(
            host=short_hostname(), ctld_addr=spec.ctld_addr, ctld_port=CTLD_PORT, slurmd_port=SLURMD_PORT,
            state=s, nodes=spec.node_list(), cpus=spec.cpus_per_node, memory_mb=memory,
            grace_s=spec.grace_s, version=slurm_version(), accounting=spec.accounting, dbd_port=DBD_PORT))
        (s / "spec.json").write_text(json.dumps(asdict(spec)))

    def _network(self, spec: Spec) -> None:
        run_command("ip", "link", "add", BRIDGE, "type", "bridge")
        run_command("ip", "addr", "add", f"{spec.ctld_addr}/24", "dev", BRIDGE)
        run_command("ip", "link", "set", BRIDGE, "up")
        for node in spec.node_list():
            run_command("ip", "netns", "add", node.netns)
            run_command("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            run_command("ip", "link", "set", node.veth, "master", BRIDGE)
            run_command("ip", "link", "set", node.veth, "up")
            inside = ("ip", "-n", node.netns)
            run_command(*inside, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            run_command(*inside, "link", "set", "eth0", "up")
            run_command(*inside, "link", "set", "lo", "up")
            # No default route: nothing leaves the nodes' subnet, and a name lookup (c10d asks one of each peer's
            # address) fails at once instead of waiting out the resolver's timeouts for a server it cannot reach.

    def _start_munge(self) -> None:
        m = self.state_dir / "munge"
        key = m / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        run_command("munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
                    f"--pid-file={m}/munged.pid", f"--log-file={self.state_dir}/log/munged.log",
                    f"--seed-file={m}/munged.seed")

    def _start_slurmctld(self) -> None:
        # -i: ignore state from an earlier cluster of another shape; -c: start clean, no stale jobs.
        run_command("slurmctld", "-c", "-i", "-f", str(self.conf))

    def _start_slurmd(self, node: Node) -> None:
        run_command("nsenter", f"--net=/var/run/netns/{node.netns}", "slurmd", "-N", node.name, "-f", str(self.conf))

    def wait_ready(self, spec: Spec, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every node reports idle (or allocated) to the controller."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                states = self.node_states()
            except OSError:  # sinfo did not answer in time: no answer, as when it fails
                states = {}
            if len(states) == spec.nodes and all(_usable(s) for s in states.values()):
                return
            time.sleep(0.2)
        bad = {n: s for n, s in states.items() if not _usable(s)} or "no answer from slurmctld"
        raise ClusterError(f"local cluster not ready after {timeout_s:.0f}s: {bad}; logs in {self.state_dir}/log")

    def node_states(self) -> dict[str, str]:
        """Each node's state, as the cluster's controller gives it (`hpc.slurm.node_states`)."""
        return slurm.node_states(self.env)

    # --- a node failure -------------------------------------------------------------------------------------

    def fail_node(self, name: str) -> list[int]:
        """A power cut on one node: every process in its namespace (slurmd, the job steps, Ray) killed at once,
        with no signal it could answer. Slurm learns of it only by the silence; `up` brings the node back.
        Returns the pids killed."""
        spec = self.spec()
        node = next((n for n in spec.node_list() if n.name == name), None) if spec else None
        if node is None:
            raise ClusterError(f"{name}: not a node of the local cluster"
                               + (f" ({', '.join(n.name for n in spec.node_list())})" if spec else " (it is down)"))
        pids = list(netns_processes(node.netns))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def failed_nodes(self, spec: Spec) -> list[Node]:
        """Nodes whose slurmd is gone."""
        run = self.state_dir / "run"
        return [n for n in spec.node_list() if not _alive_pid(pid_from(run / f"slurmd-{n.name}.pid"))]

    # --- down --------------------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every daemon and process of the cluster and remove its namespaces and bridge; idempotent."""
        spec = self.spec()
        nodes = spec.node_list() if spec else []
        netns = _cluster_netns()
        for ns in netns:
            kill_all(list(netns_processes(ns)))
        for name in ("slurmdbd.pid", "slurmctld.pid"):
            kill_all(pid_from(self.state_dir / "run" / name))
        if spec and spec.accounting:
            from hpc.local_accounting import stop_accounting

            stop_accounting(self)
        kill_all(pid_from(self.state_dir / "munge" / "munged.pid"))
        for ns in netns:
            run_command("ip", "netns", "delete", ns, check=False)
        for node in nodes:
            run_command("ip", "link", "delete", node.veth, check=False)
        if _link_exists(BRIDGE):
            run_command("ip", "link", "delete", BRIDGE, check=False)
        (self.state_dir / "spec.json").unlink(missing_ok=True)

    # --- status ------------------------------------------------------------------------------------------

    def controller_alive(self) -> bool:
        """munged and slurmctld run: the cluster is up, though some of its nodes may have failed."""
        return all(_alive_pid(pid_from(path)) for path in
                   (self.state_dir / "munge" / "munged.pid", self.state_dir / "run" / "slurmctld.pid"))

    def leftovers(self) -> list[str]:
        """What of a cluster remains on this machine: daemons, namespaces, bridge (empty after `down`)."""
        found = [f"netns {n}" for n in _cluster_netns()]
        if _link_exists(BRIDGE):
            found.append(f"bridge {BRIDGE}")
        state = str(self.state_dir)
        for pid, cmd in processes().items():
            if state in cmd and any(d in cmd for d in ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd")):
                found.append(f"process {pid}: {cmd[:80]}")
        return found


def check_prerequisites() -> None:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if os.geteuid() != 0:
        raise ClusterError("`rlhpc cluster` needs root: it creates network namespaces and starts Slurm's daemons")
    if missing:
        raise ClusterError(f"missing commands: {', '.join(missing)}; install them with "
                           f"`apt-get install {PACKAGES}` (Debian/Ubuntu)")


def slurm_version() -> tuple[int, int]:
    """(major, minor) of the installed Slurm, from `slurmctld -V` ("slurm-wlm 22.05.8" or "slurm 23.11.4")."""
    out = run_command("slurmctld", "-V").stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if not m:
        raise ClusterError(f"cannot read Slurm's version from `slurmctld -V`: {out.strip()!r}")
    return int(m.group(1)), int(m.group(2))


def _usable(state: str) -> bool:
    return state.rstrip("*~#!%$@^-").lower() in {"idle", "allocated", "mixed", "completing"}


def run_command(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def _cluster_netns() -> list[str]:
    """The nodes' namespaces of any local cluster on this machine (their names are fixed, like the bridge's)."""
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(PREFIX))


def netns_processes(ns: str) -> dict[int, str]:
    """The processes in a node's network namespace: pid -> command line (arguments joined by spaces)."""
    return processes(Path("/var/run/netns", ns))


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive_pid(pid: int | None) -> bool:
    return pid is not None and alive(pid)


def kill_all(pids: list[int] | int | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout_s`."""
    pids = [p for p in ([pids] if isinstance(pids, int) else pids or []) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while (pids := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            return


def short_hostname() -> str:
    return os.uname().nodename.split(".")[0]


def _machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
