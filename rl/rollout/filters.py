"""The filters of sampling (slime's `filter_hub`), called with the `[rollout]` section as `args`.

- Dynamic-sampling filters (`rollout.dynamic_sampling_filter_path`): `f(args, samples)` with the rewarded
  samples of one prompt; True keeps the group.
- Buffer filters (`rollout.buffer_filter_path`): `f(args, rollout_id, buffer, num_samples)` removes and
  returns at most `num_samples` groups of the partial-rollout buffer to continue first.
"""

from __future__ import annotations

from typing import Any

from rl.sample import Sample

DEFAULT = "rl.rollout.filters:check_reward_nonzero_std"
BUFFER_DEFAULT = "rl.rollout.filters:pop_first"


def check_reward_nonzero_std(args: Any, samples: list[Sample]) -> bool:
    """Keep a group whose rewards are not all equal: with equal rewards every GRPO advantage of the group is
    zero and it teaches nothing."""
    return len({s.reward for s in samples}) > 1


def pop_first(args: Any, rollout_id: int, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """The oldest groups first."""
    taken = buffer[:num_samples]
    del buffer[:num_samples]
    return taken
