"""The network environment of a job: which interface reaches the other nodes, which InfiniBand/RoCE ports are
up, and the NCCL / Gloo / torch variables that follow from them.

Computed values are the defaults only: what the user sets in the environment, then in `[slurm.env]`, wins.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROCE_V2 = "RoCE v2"
_IPV4_MAPPED = "0000:0000:0000:0000:0000:ffff:"


@dataclass(frozen=True)
class Route:
    ifname: str
    source: str
    """This node's address on `ifname`: the one the other nodes reach it at."""


@dataclass(frozen=True)
class IbPort:
    device: str
    port: int
    link_layer: str
    """"InfiniBand", or "Ethernet" for RoCE."""
    roce_v2_ipv4_gid: int | None
    """Index of a RoCE v2 GID carrying an IPv4 address (what NCCL_IB_GID_INDEX must name on RoCE fabrics)."""

    @property
    def hca(self) -> str:
        return f"{self.device}:{self.port}"


def route_to(address: str) -> Route:
    """The interface and source address this node uses to reach `address` (`ip route get`: no packet is sent)."""
    p = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True, text=True)
    if p.returncode != 0:
        raise OSError(f"no route from this node to {address}: {p.stderr.strip()}")
    entry = json.loads(p.stdout)[0]
    return Route(entry["dev"], entry.get("prefsrc") or "127.0.0.1")


def address_of(ifname: str) -> str:
    """The IPv4 address of interface `ifname` (for an interface named in `[ray] socket_ifname`)."""
    p = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", ifname], capture_output=True, text=True)
    addrs = [a["local"] for link in (json.loads(p.stdout or "[]")) for a in link.get("addr_info", [])]
    if p.returncode != 0 or not addrs:
        raise OSError(f"interface {ifname!r} (ray.socket_ifname) has no IPv4 address on this node")
    return addrs[0]


def ib_ports(sysfs: Path = Path("/sys")) -> list[IbPort]:
    """Active ports of `/sys/class/infiniband/*/ports/*`."""
    found = []
    for dev in sorted((sysfs / "class/infiniband").glob("*")):
        for port in sorted((dev / "ports").glob("*"), key=lambda p: int(p.name)):
            if "ACTIVE" not in _read(port / "state"):
                continue
            found.append(IbPort(dev.name, int(port.name), _read(port / "link_layer") or "InfiniBand",
                                _roce_v2_ipv4_gid(port)))
    return found


def _roce_v2_ipv4_gid(port: Path) -> int | None:
    for kind in sorted((port / "gid_attrs/types").glob("*"), key=lambda p: int(p.name)):
        if _read(kind) == ROCE_V2 and _read(port / "gids" / kind.name).startswith(_IPV4_MAPPED):
            return int(kind.name)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def gpudirect_rdma(sysfs: Path = Path("/sys")) -> bool:
    """Whether the kernel module that lets NICs read GPU memory directly is loaded."""
    return any((sysfs / "module" / m).exists() for m in ("nvidia_peermem", "nv_peer_mem"))


def computed_env(route: Route, ports: list[IbPort], *, gdr: bool) -> dict[str, str]:
    """The defaults rlhpc sets for a job's collectives.

    - NCCL/GLOO_SOCKET_IFNAME: the interface routing to the head, so bootstrap never picks docker0 or a
      management network that the other nodes cannot reach.
    - NCCL_IB_HCA: the active ports only; with none, NCCL_IB_DISABLE=1 so NCCL does not probe absent HCAs.
    - NCCL_IB_GID_INDEX: on RoCE, the RoCE v2 IPv4 GID (NCCL's default index 0 is RoCE v1 / link-local).
    - NCCL_NET_GDR_LEVEL=PHB when GPUDirect RDMA is loaded: GDR through the host bridge, as on HGX nodes.
    - NCCL_CROSS_NIC=0 with several HCAs: rail-optimised fabrics keep each ring on one rail.
    - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed peer ends the job (and Slurm requeues it) instead of a hang.
    - CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron's tensor-parallel communication overlap requires it.
    """
    env = {
        "NCCL_SOCKET_IFNAME": route.ifname,
        "GLOO_SOCKET_IFNAME": route.ifname,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    if not ports:
        env["NCCL_IB_DISABLE"] = "1"
        return env
    env["NCCL_IB_HCA"] = ",".join(p.hca for p in ports)
    roce = [p for p in ports if p.link_layer == "Ethernet"]
    if roce:
        gids = {p.roce_v2_ipv4_gid for p in roce if p.roce_v2_ipv4_gid is not None}
        env["NCCL_IB_GID_INDEX"] = str(min(gids)) if gids else "3"
    if gdr:
        env["NCCL_NET_GDR_LEVEL"] = "PHB"
    if len({p.device for p in ports}) > 1:
        env["NCCL_CROSS_NIC"] = "0"
    return env


def job_env(route: Route, *, sysfs: Path = Path("/sys"), environ: Mapping[str, str],
            settings: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment to run the job's processes with, the network variables and where each came from).

    Precedence: computed < the node's environment < `settings` (the run's `[slurm.env]` and `[ray]` fields).
    """
    computed = computed_env(route, ib_ports(sysfs), gdr=gpudirect_rdma(sysfs))
    env = {**computed, **environ, **settings}
    origin = {k: "config" if k in settings else "environment" if k in environ else "computed"
              for k in {**computed, **settings}}
    shown = {k: f"{env[k]} ({origin[k]})" for k in sorted(origin)}
    return env, shown
