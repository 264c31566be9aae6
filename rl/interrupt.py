"""A request to stop a run early (the job was told its time is up), read by the loop at its safe points.

The loop stops at the first of: a rollout still generating (abandoned: the state before it is whole), or the
end of a rollout's training and weight sync. It then saves a checkpoint if the time left allows one.
"""

from __future__ import annotations

import threading
import time


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._deadline: float | None = None

    def set(self, time_left_s: float | None = None) -> None:
        """Ask the run to stop; `time_left_s` is how long the process has before it is killed, if known.
        Safe to call from a signal handler."""
        if time_left_s is not None and self._deadline is None:
            self._deadline = time.monotonic() + time_left_s
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def time_left(self) -> float | None:
        """Seconds until the kill, None when unknown or no stop was asked."""
        return None if self._deadline is None else self._deadline - time.monotonic()


class Interrupted(Exception):
    """Raised inside a rollout that a stop request abandons."""
