"""One generated response and everything the loop learns about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """A prompt's response: what custom reward functions, filters and generate functions receive."""

    prompt: str
    response: str = ""
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    """Position of the prompt in its dataset."""
    group_index: int = 0
    """Which prompt group of the rollout the sample belongs to."""
    reward: float | None = None
