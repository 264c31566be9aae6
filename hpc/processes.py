"""The processes of this machine, as /proc shows them: the one place rlhpc walks the process table.

A command line is its arguments joined by spaces (a process that has exited but is not yet reaped shows an
empty one). A process may end between the walk and its use: callers that signal one expect
ProcessLookupError.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROC = Path("/proc")


def processes(net_namespace: Path | None = None) -> dict[int, str]:
    """Every process of this machine: pid -> command line. With `net_namespace` (a namespace file, such as
    /var/run/netns/NAME or /proc/PID/ns/net) only those in that network namespace, as `ip netns pids` finds
    them; none when the file is missing."""
    wanted = None
    if net_namespace is not None:
        try:
            st = net_namespace.stat()
        except OSError:
            return {}
        wanted = (st.st_dev, st.st_ino)
    found = {}
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted is not None:
                st = (proc / "ns" / "net").stat()
                if (st.st_dev, st.st_ino) != wanted:
                    continue
            found[int(proc.name)] = command_line(proc / "cmdline")
        except OSError:  # it ended meanwhile
            continue
    return found


def command_line(path: Path) -> str:
    """A /proc/PID/cmdline file as text, its arguments joined by spaces."""
    return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one that has exited but is not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = PROC / str(pid) / "stat"
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def process_start(pid: int) -> str | None:
    """When process `pid` started, as `ps` tells it in UTC (the same for every reader), or None when there is
    no such process."""
    try:
        p = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10,
                           env={**os.environ, "TZ": "UTC", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None
