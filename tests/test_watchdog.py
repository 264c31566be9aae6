"""The watchdog and the stack dumps, on real processes: a blocked one still tells where it is stuck."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hpc import stacks
from hpc.watchdog import Watchdog

BLOCKED = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from hpc import stacks

    stacks.register(Path(sys.argv[1]))

    def all_reduce_that_never_returns():
        print("ready", flush=True)
        threading.Event().wait()

    all_reduce_that_never_returns()
""")


def test_a_blocked_process_writes_its_stacks_when_asked(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline() == "ready\n"
        written = stacks.dump(tmp_path)
        assert [p.name for p in written] == [f"{os.uname().nodename}-{proc.pid}.txt"]
        deadline = time.monotonic() + 10
        while "all_reduce_that_never_returns" not in written[0].read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "all_reduce_that_never_returns" in written[0].read_text()
        assert proc.poll() is None  # asked, not killed
    finally:
        proc.kill()
        proc.wait()
    assert stacks.dump(tmp_path) == []  # a process gone is skipped


def test_no_progress_triggers_once_with_the_reason(tmp_path: Path) -> None:
    beat = tmp_path / "progress.json"
    beat.write_text("{}")  # an earlier job's: no hang is counted from it
    reasons: list[str] = []
    dog = Watchdog(beat, hang_timeout_s=0.5, on_trigger=reasons.append, poll_s=0.05)
    dog.start()
    time.sleep(1.0)
    assert reasons == []
    for _ in range(4):  # progress keeps it quiet
        time.sleep(0.2)
        beat.write_text("{}")
    assert reasons == []
    dog.join(timeout=5)
    assert len(reasons) == 1 and reasons[0].startswith("no progress for") and "hang_timeout_s" in reasons[0]


def test_a_node_missing_longer_than_the_timeout_triggers(tmp_path: Path) -> None:
    missing = {"count": 0}

    def lost() -> list[str]:
        missing["count"] += 1
        return ["node2"] if missing["count"] > 3 else []

    reasons: list[str] = []
    dog = Watchdog(tmp_path / "progress.json", hang_timeout_s=60, on_trigger=reasons.append, lost_hosts=lost,
                   node_timeout_s=0.3, poll_s=0.05)
    dog.start()
    dog.join(timeout=5)
    assert len(reasons) == 1 and reasons[0].startswith("node node2 lost") and "node_timeout_s" in reasons[0]
