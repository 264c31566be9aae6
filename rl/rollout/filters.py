"""Dynamic-sampling filters (`rollout.dynamic_sampling_filter_path`, slime's `filter_hub`): called as
`f(args, samples)` with the `[rollout]` section and the rewarded samples of one prompt; True keeps the group."""

from __future__ import annotations

from typing import Any

from rl.sample import Sample

DEFAULT = "rl.rollout.filters:check_reward_nonzero_std"


def check_reward_nonzero_std(args: Any, samples: list[Sample]) -> bool:
    """Keep a group whose rewards are not all equal: with equal rewards every GRPO advantage of the group is
    zero and it teaches nothing."""
    rewards = [s.reward for s in samples]
    return max(rewards) > min(rewards)
