"""A watchdog inside the job: a run that makes no progress, or loses a node, ends its job (to be requeued)
instead of holding the allocation until the time limit.

Progress is the modification time of a heartbeat file the workload rewrites at each of its phases; a hang is no
change for `hang_timeout_s` once the workload has written it in this job. A lost node is a host of the
allocation missing from the job's Ray cluster for `node_timeout_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 1.0
log = logging.getLogger(__name__)


class Watchdog(threading.Thread):
    def __init__(self, heartbeat: Path, hang_timeout_s: float, on_trigger: Callable[[str], None], *,
                 lost_hosts: Callable[[], list[str]] | None = None, node_timeout_s: float = float("inf"),
                 poll_s: float = POLL_S):
        super().__init__(name="rlhpc-watchdog", daemon=True)
        self.heartbeat, self.hang_timeout_s, self.on_trigger = heartbeat, hang_timeout_s, on_trigger
        self.lost_hosts, self.node_timeout_s, self.poll_s = lost_hosts, node_timeout_s, poll_s
        self._halt = threading.Event()
        self._since = time.time()
        self.blamed: list[str] = []  # the hosts the verdict names (none for a hang), set before on_trigger

    def stop(self) -> None:
        """Stop watching; returns once no check is under way."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def check(self, missing_since: dict[str, float]) -> str | None:
        """Why the job should end now, if it should."""
        now = time.time()
        try:
            last = self.heartbeat.stat().st_mtime
        except OSError:
            last = None
        # Armed by the workload's first heartbeat of this job: start-up has timeouts of its own.
        if last is not None and last >= self._since and now - last > self.hang_timeout_s:
            return f"no progress for {now - last:.0f}s (run.hang_timeout_s = {self.hang_timeout_s:.0f})"
        if self.lost_hosts is not None:
            lost = set(self.lost_hosts())
            for host in lost:
                missing_since.setdefault(host, now)
            for host in set(missing_since) - lost:
                del missing_since[host]
            if gone := sorted(h for h, t in missing_since.items() if now - t > self.node_timeout_s):
                self.blamed = gone
                return f"node {', '.join(gone)} lost: gone from the job's Ray cluster for more than " \
                       f"{self.node_timeout_s:.0f}s (run.node_timeout_s)"
        return None

    def run(self) -> None:
        missing_since: dict[str, float] = {}
        while not self._halt.wait(self.poll_s):
            try:
                reason = self.check(missing_since)
            except Exception:  # a watchdog that dies silently watches nothing: say so, go on
                log.exception("watchdog check failed")
                continue
            if reason is not None:
                log.error("watchdog: %s", reason)
                self.on_trigger(reason)
                return
