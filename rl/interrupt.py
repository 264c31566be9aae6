"""A request to stop a run early (the job was told its time is up, or its end is near), read by the loop at its
safe points.

The loop stops at the first of: a rollout still generating (abandoned: the state before it is whole), or the
end of a rollout's training and weight sync. It then saves a checkpoint if the time left allows one.

Knowing when the process will be killed (`end`, the job's end time), the loop also stops by itself, without any
signal, at the last safe point from which another rollout and a save still fit (`Driver.out_of_time`).
"""

from __future__ import annotations

import threading
import time


class StopRequest:
    def __init__(self, end: float | None = None) -> None:
        """`end`: when the process will be killed (epoch seconds, the time needed to tear down already taken
        off), if known."""
        self._event = threading.Event()
        self._kill_at = None if end is None else time.monotonic() + (end - time.time())
        self.reason: str | None = None
        """What asked for the stop ("USR2", "deadline"); None while none was asked."""

    def set(self, time_left_s: float | None = None, reason: str = "stop") -> None:
        """Ask the run to stop; `time_left_s` is how long the process has before it is killed, if known.
        Safe to call from a signal handler."""
        if time_left_s is not None:
            kill_at = time.monotonic() + time_left_s
            self._kill_at = kill_at if self._kill_at is None else min(self._kill_at, kill_at)
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def time_left(self) -> float | None:
        """Seconds until the kill, None when unknown."""
        return None if self._kill_at is None else self._kill_at - time.monotonic()


class Interrupted(Exception):
    """Raised inside a rollout that a stop request abandons."""
