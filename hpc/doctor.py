"""`rlhpc doctor`: what breaks runs at sites, checked on the login node, and (with --nodes) between nodes.

Each check says what it found and what that means for a run: preemption without a signal loses the work
since the last checkpoint, a small /dev/shm pushes Ray's object store to disk, and so on.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import resource
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpc import slurm
from hpc.network import ib_ports

QUERY_TIMEOUT_S = 20
"""How long each command doctor runs may take: no answer within it reads as "not there"."""


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    """"ok", "warn" (runs, with a risk named in `detail`), "fail" (rlhpc cannot work) or "info"."""
    found: str
    detail: str = ""


def _run(*cmd: str) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _slurm(query: Callable[..., subprocess.CompletedProcess[str]]) -> str | None:
    """What a query of `hpc.slurm` prints; None when it fails or does not answer."""
    try:
        p = query(timeout_s=QUERY_TIMEOUT_S)
    except OSError:
        return None
    return p.stdout if p.returncode == 0 else None


def parse_key_values(text: str) -> dict[str, str]:
    """`scontrol show config` lines ("JobRequeue              = 1") as a dict."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            found[key.strip()] = value.strip()
    return found


def slurm_checks(config: dict[str, str], partitions: str, version: str | None) -> list[Check]:
    """What the controller's settings mean for a run that must survive preemption and time limits."""
    checks = [Check("slurm", "ok" if version else "warn", version or "no Slurm commands answer here",
                    "" if version else "rlhpc submit falls back to the local executor")]
    if not config:
        return checks
    requeue = config.get("JobRequeue", "1")
    checks.append(Check("JobRequeue", "ok" if requeue == "1" else "warn", requeue,
                        "jobs requeue after node failure" if requeue == "1" else
                        "jobs are not requeued by default: rlhpc passes --requeue explicitly"))
    mode = config.get("PreemptMode", "OFF")
    ptype = config.get("PreemptType", "preempt/none")
    if ptype == "preempt/none" or mode.upper().startswith("OFF"):
        checks.append(Check("PreemptMode", "info", f"{mode} ({ptype})", "no preemption on this cluster"))
    else:
        checks.append(Check("PreemptMode", "ok" if "REQUEUE" in mode.upper() else "warn", f"{mode} ({ptype})",
                            "preempted jobs are requeued and resume from the latest checkpoint"
                            if "REQUEUE" in mode.upper() else
                            "preempted jobs are cancelled, not requeued: resubmit with `rlhpc resume`"))
        signal = "send_user_signal" in config.get("PreemptParameters", "") or \
            "preempt_send_user_signal" in config.get("SlurmctldParameters", "")
        checks.append(Check("preemption signal", "ok" if signal else "warn",
                            "sent" if signal else "not sent (no send_user_signal)",
                            "the job checkpoints when preempted" if signal else
                            "a preempted job is killed without warning: it loses the work since its last checkpoint"))
        graces = sorted({g for g in re.findall(r"GraceTime=(\d+)", partitions)}, key=int)
        grace = ", ".join(graces) or "0"
        checks.append(Check("GraceTime", "ok" if graces and int(graces[0]) >= 60 else "warn", f"{grace} s",
                            "time between the preemption signal and the kill; the checkpoint must fit in it"))
    min_age = config.get("MinJobAge", "300 sec")
    checks.append(Check("MinJobAge", "info", min_age,
                        "finished jobs leave squeue after this; rlhpc status then reads the run folder"))
    acct = config.get("AccountingStorageType", "accounting_storage/none")
    on = acct != "accounting_storage/none"
    checks.append(Check("accounting", "ok" if on else "info", acct,
                        "sacct knows finished jobs" if on else "no sacct: status comes from squeue and run folders"))
    return checks


def node_checks(shm: Path = Path("/dev/shm"), sysfs: Path = Path("/sys")) -> list[Check]:
    checks = []
    for package in ("ray", "torch", "submitit"):
        try:
            checks.append(Check(package, "ok", importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(package, "fail", "not installed", "pip install rlhpc installs it"))
    gpus = _gpus()
    checks.append(Check("GPUs", "ok" if gpus else "info", str(gpus) if gpus else "none",
                        "" if gpus else "CPU only: the torch backend and engine run, Megatron and SGLang do not"))
    ports = ib_ports(sysfs)
    checks.append(Check("InfiniBand/RoCE", "ok" if ports else "info",
                        ", ".join(f"{p.hca} ({p.link_layer})" for p in ports) or "no active port",
                        "" if ports else "NCCL uses TCP sockets between nodes (NCCL_IB_DISABLE=1)"))
    if shm.exists():
        total = shutil.disk_usage(shm).total
        checks.append(Check("/dev/shm", "ok" if total >= 8 << 30 else "warn", f"{total >> 20} MiB",
                            "" if total >= 8 << 30 else "small: Ray's object store is sized down to fit, or spills"))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    checks.append(Check("open files", "ok" if soft >= 65536 or soft == resource.RLIM_INFINITY else "warn", str(soft),
                        "" if soft >= 65536 else "Ray and NCCL open many sockets: ask for ulimit -n 65536"))
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if nproc != resource.RLIM_INFINITY and nproc < 16384:
        checks.append(Check("processes", "warn", str(nproc), "Ray workers may fail to start: raise ulimit -u"))
    return checks


def import_name_checks(distribution: str = "rlhpc") -> list[Check]:
    """Whether another installed distribution writes one of `distribution`'s top-level packages: pip lets two
    distributions install the same folder of site-packages (PyPI's `rl`, readline bindings, installs `rl/`),
    and whichever came last wins file by file, which breaks one or both."""
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in owners.items() if distribution in dists)
    clashes = {name: sorted(set(owners[name]) - {distribution}) for name in ours}
    found = "; ".join(f"{name} also from {', '.join(others)}" for name, others in clashes.items() if others)
    if not found:
        return [Check("import names", "ok", ", ".join(ours))]
    return [Check("import names", "fail", found,
                  f"both install the same top-level package: install {distribution} in an environment without them")]


def _gpus() -> int:
    out = _run("nvidia-smi", "-L")
    return len([line for line in (out or "").splitlines() if line.startswith("GPU ")])


def login_node_checks() -> list[Check]:
    version = _slurm(slurm.version)
    config = parse_key_values(_slurm(slurm.show_config) or "") if version else {}
    partitions = (_slurm(slurm.show_partitions) or "") if version else ""
    return (slurm_checks(config, partitions, version.strip() if version else None) + node_checks()
            + import_name_checks())


def allreduce_probe(sizes: tuple[int, ...] = (1 << 20, 16 << 20, 64 << 20), iters: int = 5) -> dict | None:
    """Run on every node of a job (one task each): all-reduce bus bandwidth between the nodes (nccl on GPUs,
    gloo otherwise) and the clock skew seen across a barrier. Rank 0 returns the figures."""
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from hpc.allocation import current
    from hpc.network import route_to
    from hpc.ray_cluster import ephemeral_range, port_block
    from hpc.slurm import node_addresses

    alloc = current()
    master = node_addresses([alloc.hosts[0]])[alloc.hosts[0]] if alloc.num_nodes > 1 else "127.0.0.1"
    if alloc.num_nodes > 1:
        ifname = route_to(master).ifname
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    port = port_block(alloc.job_number, ephemeral=ephemeral_range()).base + 9  # a slot Ray's block leaves free
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{master}:{port}",
                            rank=alloc.node_rank, world_size=alloc.num_nodes, timeout=timedelta(seconds=120))
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    try:
        dist.barrier()
        stamps = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(alloc.num_nodes)]
        dist.all_gather(stamps, torch.tensor([time.time()], dtype=torch.float64, device=device))
        skew = max(float(t) for t in stamps) - min(float(t) for t in stamps)
        busbw = {}
        n = alloc.num_nodes
        for size in sizes:
            x = torch.ones(size // 4, dtype=torch.float32, device=device)
            dist.all_reduce(x)  # warm-up: connections and buffers
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / iters
            # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce
            busbw[size] = size * 2 * (n - 1) / n / seconds / 1e9 if n > 1 else 0.0
    finally:
        dist.destroy_process_group()
    if alloc.node_rank != 0:
        return None
    return {"backend": "nccl" if cuda else "gloo", "nodes": list(alloc.hosts), "busbw_GBps": busbw,
            "clock_skew_s": skew}
