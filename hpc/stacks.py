"""The Python stacks of every process of a job, on demand, even of one blocked in C (a collective that never
returns): each process registers a signal on which faulthandler appends the stacks of all its threads to
`<folder>/<host>-<pid>.txt`; the watchdog of each node sends that signal to its node's processes.

Ray's workers register through the job's `worker_process_setup_hook` (`register_from_env`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
from pathlib import Path

DUMP_SIGNAL = signal.SIGRTMIN + 3
"""A real-time signal: no library of the job uses it, and Slurm never sends it."""
ENV = "RLHPC_STACKS_DIR"
SETUP_HOOK = f"{__name__}.register_from_env"

log = logging.getLogger(__name__)
_open: list = []  # the files faulthandler writes to must stay open


def _file(folder: Path, host: str, pid: int) -> Path:
    return folder / f"{host}-{pid}.txt"


def register(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    f = _file(folder, socket.gethostname(), os.getpid()).open("a")
    _open.append(f)
    faulthandler.register(DUMP_SIGNAL, file=f, all_threads=True)


def register_from_env() -> None:
    if ENV in os.environ:
        register(Path(os.environ[ENV]))


def dump(folder: Path) -> list[Path]:
    """Ask every registered process of this host to write its stacks; the files they write to."""
    host = socket.gethostname()
    written = []
    for path in sorted(folder.glob(f"{host}-*.txt")) if folder.is_dir() else []:
        try:
            os.kill(int(path.stem.rsplit("-", 1)[1]), DUMP_SIGNAL)
            written.append(path)
        except (ProcessLookupError, ValueError):
            continue
    log.warning("stacks of %d processes on %s written to %s", len(written), host, folder)
    return written
