"""The tiny run's own reward, given as slowly as a real grader gives it: an interruption takes Slurm about a
second to deliver, as long as the tiny run's six rollouts; a run that ends first leaves a chaos test nothing to
interrupt."""

from __future__ import annotations

import asyncio

from rl.rewards import score

DELAY_S = 1.0


async def reward(rollout, sample) -> float:
    await asyncio.sleep(DELAY_S)
    return score(sample.metadata.get("rm_type") or rollout.rm_type, sample.response, sample.label, sample.metadata)
