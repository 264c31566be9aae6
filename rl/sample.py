"""One generated response and everything the loop learns about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rl.rollout.engine import FinishReason, Generation, sample_seed

Status = Literal["pending", "completed", "truncated", "aborted"]

_STATUS_AFTER: dict[FinishReason, Status] = {"stop": "completed", "length": "truncated", "abort": "aborted"}


@dataclass
class Sample:
    """A prompt's response: what generate functions, reward functions and filters receive (slime's
    `Sample`). `tokens` are the prompt's ids followed by the response's; the last `response_length` of them
    are the response, and `loss_mask`, `rollout_log_probs` and `weight_versions` run along those."""

    prompt: str
    response: str = ""
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    """Position of the prompt in its dataset."""
    group_index: int = 0
    """Which prompt group of the rollout the sample belongs to."""
    reward: float | None = None
    tokens: list[int] = field(default_factory=list)
    response_length: int = 0
    loss_mask: list[int] = field(default_factory=list)
    """1 on each response token the policy is trained on; 0 on what the environment wrote (tool output)."""
    rollout_log_probs: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    """The policy version (the engine's weights) of each generation that wrote into the response."""
    status: Status = "pending"
    seed: int = 0
    """The sample's own randomness: generate functions derive every engine call's seed from it."""

    @property
    def scored_reward(self) -> float:
        """The reward of a sample that has been scored, as every sample that leaves a rollout has."""
        if self.reward is None:
            raise ValueError(f"sample {self.index} of group {self.group_index} has no reward: it was never scored")
        return self.reward

    @property
    def response_ids(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.response_length:]

    def append_generation(self, gen: Generation) -> None:
        """Add tokens the policy generated (trained on) and take the generation's end as the sample's."""
        self.tokens += gen.output_ids
        self.response_length += len(gen.output_ids)
        self.loss_mask += [1] * len(gen.output_ids)
        self.rollout_log_probs += gen.log_probs
        if gen.output_ids:  # an abort before the first token generated nothing, under no policy
            self.weight_versions.append(gen.weight_version)
        self.status = _STATUS_AFTER[gen.finish_reason]

    def append_observation(self, ids: list[int]) -> None:
        """Add tokens the environment wrote (a tool's output, a user turn): context for the policy, no loss."""
        self.tokens += ids
        self.response_length += len(ids)
        self.loss_mask += [0] * len(ids)
        self.rollout_log_probs += [0.0] * len(ids)

    def next_seed(self) -> int:
        """The seed of the sample's next engine call: its own at first, then one derived from how far the
        response has got, so that every call draws afresh and a rerun draws the same."""
        if self.response_length == 0:
            return self.seed
        return sample_seed(self.seed, self.response_length, len(self.weight_versions))
