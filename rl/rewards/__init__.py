"""Rewards: the rule-based graders slime names (`rm_type`), custom functions and a remote reward model.

`score(rm_type, response, label, metadata)` grades one response with a built-in rule;
`compute_rewards(rollout_config, samples)` grades a batch the way the config says (custom_rm_path, then
remote_rm, then the rule).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from rl.rewards.dapo import dapo_reward
from rl.rewards.deepscaler import deepscaler_reward
from rl.rewards.f1 import f1_reward
from rl.rewards.gpqa import gpqa_reward
from rl.rewards.math import last_boxed, math_reward

RULES: dict[str, Callable[..., float]] = {
    "math": math_reward,
    "deepscaler": deepscaler_reward,
    "dapo": dapo_reward,
    "f1": f1_reward,
    "gpqa": gpqa_reward,
}
_READS_LAST_BOXED = {"math", "deepscaler"}


def score(rm_type: str, response: str, label: Any, metadata: dict[str, Any] | None = None) -> float:
    """Grade one response with a built-in rule.

    - `math`: 1 if the last `\\boxed{}` answer is equivalent to the label (math-verify), else 0.
    - `deepscaler`: as `math`, on the text after `</think>` only; no `</think>` scores 0.
    - `dapo`: +1 if the last `Answer: ...` in the final 300 characters is equivalent to the label, else −1.
    - `f1`: SQuAD token F1 between response and label.
    - `gpqa`: 1 if the chosen option letter is the correct one (see `rl.rewards.gpqa`).
    - `boxed_<type>`: the response is cut down to its last `\\boxed{}` content ("" if none) before grading;
      for `math` and `deepscaler`, which read the last box themselves, the prefix changes nothing.
    """
    base = rm_type.removeprefix("boxed_")
    if base not in RULES:
        raise ValueError(f"unknown rm_type {rm_type!r}; known: {', '.join(RULES)} (optionally boxed_*), remote_rm")
    if base != rm_type and base not in _READS_LAST_BOXED:
        response = last_boxed(response) or ""
    if base == "gpqa":  # the only rule that reads the options from metadata
        return gpqa_reward(response, label, metadata)
    return float(RULES[base](response, label))


async def compute_rewards(rollout: Any, samples: list[Any]) -> list[float]:
    """Rewards of a batch of `rl.sample.Sample`s under a `[rollout]` config section.

    A custom function (`custom_rm_path`) is called as `f(rollout, sample)` per sample, or `f(rollout, samples)`
    once with `group_rm`; it may be sync or async. `remote_rm` posts each sample to `rm_url`.
    """
    if rollout.custom_rm_path:
        from rl.hooks import load_function

        fn, source = load_function(rollout.custom_rm_path), rollout.custom_rm_path
        if rollout.group_rm:
            rewards = await _maybe_await(fn(rollout, samples))
            if len(rewards) != len(samples):
                raise ValueError(f"{rollout.custom_rm_path} returned {len(rewards)} rewards for {len(samples)} samples")
        else:
            rewards = await asyncio.gather(*(_maybe_await(fn(rollout, s)) for s in samples))
        return [reward_value(r, source, rollout.reward_key) for r in rewards]
    rm_type = rollout.rm_type
    if rm_type == "remote_rm":
        from rl.rewards.remote import remote_reward

        return list(
            await asyncio.gather(
                *(
                    remote_reward(
                        rollout.rm_url,
                        {"prompt": s.prompt, "response": s.response, "label": s.label},
                        timeout_s=rollout.rm_timeout_s,
                        max_retries=rollout.rm_max_retries,
                        deadline_s=rollout.rm_deadline_s,
                        reward_key=rollout.reward_key,
                    )
                    for s in samples
                )
            )
        )
    return [score(s.metadata.get("rm_type") or rm_type, s.response, s.label, s.metadata) for s in samples]


def reward_source(rollout: Any, sample: Any) -> str:
    """What `compute_rewards` grades `sample` with, as the config names it (for error messages)."""
    if rollout.custom_rm_path:
        return rollout.custom_rm_path
    if rollout.rm_type == "remote_rm":
        return f"remote_rm at {rollout.rm_url}"
    return f"rm_type {sample.metadata.get('rm_type') or rollout.rm_type!r}"


def reward_value(reward: Any, source: str, reward_key: str | None) -> float:
    """The number a reward trains on: a bare number, or with `reward_key` (slime's `--reward-key`) that entry of
    the dict a reward model answers (e.g. {"accuracy": 1, "format": 0.5})."""
    if reward_key is not None:
        if not isinstance(reward, dict) or reward_key not in reward:
            raise ValueError(f"{source} answered {reward!r}, which has no {reward_key!r} (rollout.reward_key)")
        reward = reward[reward_key]
    if isinstance(reward, dict):
        raise ValueError(f"{source} answered a dict ({', '.join(map(str, reward))}): name the entry to train on "
                         "in rollout.reward_key")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise ValueError(f"{source} answered {reward!r}, not a number")
    return float(reward)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
