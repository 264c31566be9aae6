"""`progress.json` in the run folder: which rollout and phase the driver is in, and since when.

Written (atomically, not durably: it is replaced several times a rollout) at every phase change, so that a
watchdog can tell a stuck run from a slow one and a drill can interrupt a chosen phase.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

FILE = "progress.json"
PHASES = ("start", "rollout", "train", "sync", "eval", "save", "stopped", "done")


class Heartbeat:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / FILE
        self._tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")

    def beat(self, rollout_id: int, phase: str) -> None:
        assert phase in PHASES, phase
        self._tmp.write_text(json.dumps({"rollout_id": rollout_id, "phase": phase, "time": time.time(),
                                         "host": socket.gethostname(), "pid": os.getpid()}))
        os.replace(self._tmp, self.path)


def read(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
