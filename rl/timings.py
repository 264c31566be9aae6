"""How long a run's checkpoint saves and rollouts take, measured by the loop and kept in the run folder
(`timings.json`): an attempt plans its stop before the job's end from its first rollout on, and `submit`,
`resume` and `doctor` compare the save with the grace the stop signal gives."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "timings.json"
SAVE_MARGIN = 2.0
"""A save is planned for as taking this many times the last one (disks slow down, checkpoints grow with
optimizer state): a stop leaves at least that much time, or does not save."""


@dataclass
class Timings:
    save_s: float | None = None
    """Seconds of the last checkpoint save, from its start until it was sealed."""
    step_s: float | None = None
    """Seconds of the longest recent rollout (generation, training, weight sync, evaluation)."""

    @classmethod
    def read(cls, run_dir: Path) -> Timings:
        """What the run measured last; nothing known when the file is missing or damaged."""
        try:
            found = json.loads((Path(run_dir) / FILE).read_text())
            return cls(save_s=_seconds(found.get("save_s")), step_s=_seconds(found.get("step_s")))
        except (OSError, ValueError, AttributeError):
            return cls()

    def write(self, run_dir: Path) -> None:
        tmp = Path(run_dir) / f".{FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, Path(run_dir) / FILE)

    def room_for(self, time_left_s: float) -> bool:
        """Whether another rollout and a save after it fit in `time_left_s`; True while no rollout was measured
        (nothing to plan with yet: the stop signal is the fallback), a save not yet measured counted as none."""
        if self.step_s is None:
            return True
        return time_left_s >= self.step_s + SAVE_MARGIN * (self.save_s or 0.0)


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None
