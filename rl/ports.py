"""Free TCP ports: one for a rendezvous the caller binds at once (torch.distributed's store), or the ports of
a server about to be launched (an SGLang server's), which it binds only seconds or minutes later."""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import tempfile
import time
from pathlib import Path

LEASE_S = 3600.0
"""How long a port `server_ports` handed out is withheld from the node's other callers: longer than a server's
start (`sglang_engine.START_TIMEOUT_S`), after which the server holds the port itself."""
LOWEST = 20000
"""The lowest port `server_ports` hands out (below: well-known services' ports)."""


def free_port(host: str = "") -> int:
    """A port the kernel has just handed out on `host` (all interfaces by default) and taken back. Another
    process may take it before the caller binds it; the callers bind it at once, and a clash fails loudly."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_ports(count: int, registry: Path | None = None) -> list[int]:
    """`count` distinct ports for a server launched next: each binds on every interface now, lies outside the
    kernel's ephemeral range, from which outgoing connections and `free_port` draw, so that none of those takes
    it before the server binds it (below the range; above it on a node whose range starts low; anywhere from
    `LOWEST` where it covers them all, as SGLang then does), and was handed out to no caller on this node within
    `LEASE_S`, so that engines launched side by side on one node, each from its own process, get ports of their
    own. The node's callers agree through `registry` (by default a file of this user's in the temporary folder),
    locked while it is read and rewritten."""
    path = registry or Path(tempfile.gettempdir()) / f"rlhpc-ports-{os.getuid()}.json"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released as the file closes
        f.seek(0)
        now = time.time()
        leases = {port: t for port, t in _leases(f.read()).items() if now - t < LEASE_S}
        low, high = _ephemeral_range()
        # Below the range first: above it, zmq's random ports (49152-65535, SGLang's message queues) may land.
        candidates = range(LOWEST, low) or range(high + 1, 65536) or range(LOWEST, 65536)
        chosen: list[int] = []
        for port in random.sample(candidates, len(candidates)):
            if port not in leases and _binds(port):
                chosen.append(port)
                if len(chosen) == count:
                    break
        else:
            raise OSError(f"fewer than {count} free ports from {LOWEST} on this node, outside the ephemeral range "
                          f"{low}-{high} where it leaves room")
        leases |= dict.fromkeys(chosen, now)
        f.seek(0)
        f.truncate()
        json.dump({str(port): t for port, t in leases.items()}, f)
    return chosen


def _leases(text: str) -> dict[int, float]:
    """The registry's leases; none from an empty file, or one a killed writer left half written."""
    try:
        return {int(port): float(t) for port, t in json.loads(text).items()}
    except ValueError:
        return {}


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
