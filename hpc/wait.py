"""Waiting for something to happen (a file, a port, a daemon) by looking for it, never by sleeping a fixed time."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def until(ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Call `ready` every `poll_s` until it is true (True) or `timeout_s` has passed (False); exceptions from
    `ready` propagate, so it can also fail fast."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0
