"""DAPO's reward: +1 if the last `Answer: ...` line of the response is right, −1 otherwise."""

from __future__ import annotations

import re

from rl.rewards.math import equivalent, truth_of

ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
TAIL_CHARS = 300
"""DAPO reads only the response's end (the longest MATH-500 answer has 159 characters)."""


def dapo_reward(response: str, label: object) -> float:
    matches = ANSWER.findall(response[-TAIL_CHARS:])
    truth = truth_of(label)
    if not matches or not truth.strip():
        return -1.0
    return 1.0 if equivalent(matches[-1], truth) else -1.0
