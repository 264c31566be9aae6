"""DeepScaleR's rule-based reward: 1 if the final boxed answer after the reasoning is right, else 0."""

from __future__ import annotations

from rl.rewards.math import equivalent, last_boxed, truth_of


def deepscaler_reward(response: str, label: object) -> float:
    """Only the text after `</think>` (or `###Response`) counts: a response that never closes its reasoning
    (truncated, or no thinking at all) scores 0, as in DeepScaleR and slime."""
    if "</think>" in response:
        solution = response.split("</think>")[-1]
    elif "###Response" in response:
        solution = response.split("###Response")[1]
    else:
        return 0.0
    answer = last_boxed(solution)
    truth = truth_of(label)
    if answer is None or not truth.strip():
        return 0.0
    return float(equivalent(answer, truth))
