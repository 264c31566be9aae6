"""A rollout's groups: prompts drawn from the data (after the partial-rollout buffer's), each sample's
response from the generate function, rewards, and dynamic sampling's filter.

- Plain: `rollout_batch_size` prompts × `n_samples_per_prompt` samples.
- Dynamic sampling (`over_sampling_batch_size`, slime's): rounds of that many prompts, each round generated
  whole and its groups kept in order while they pass the filter, until `rollout_batch_size` groups have;
  groups beyond those are discarded unseen. Reproducible sample for sample.
- Partial rollout (`partial_rollout`, with over-sampling; slime's, after Kimi k1.5): groups are judged as
  they finish; once enough have passed, the engines abort the rest, which wait in the buffer with what they
  have generated (and the rollout they began in, `metadata["start_rollout_id"]`) and are continued first
  (`buffer_filter_path`) by the next rollout. Which groups finish first depends on timing, so such a run is
  not reproducible sample for sample; the buffer is part of the checkpoint, so a resume loses none of it.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from rl.config import RLConfig
from rl.data import PromptCursor, PromptDataset
from rl.errors import RunError
from rl.hooks import load_function
from rl.rewards import compute_rewards, reward_source
from rl.rollout import filters, generate
from rl.rollout.client import EngineClient
from rl.rollout.engine import SamplingParams, sample_seed
from rl.sample import Sample

MAX_SAMPLING_ROUNDS = 32
"""Rounds of over-sampling a rollout may take before a filter that passes too few groups is an error."""

Group = list[Sample]
KeepGroup = Callable[[Any, Group], bool]
"""A dynamic-sampling filter: `f(args, group)`, True keeps the group."""


def _hook(field: str, path: str) -> Callable[..., Any]:
    try:
        return load_function(path)
    except ValueError as e:
        raise RunError(f"{field}: {e}") from None


class Sampler:
    def __init__(self, cfg: RLConfig, tokenizer: Any, dataset: PromptDataset):
        r = self.r = cfg.rollout
        self.tokenizer, self.dataset, self.run_seed = tokenizer, dataset, cfg.run.seed
        self.cursor = PromptCursor(len(dataset), shuffle=r.rollout_shuffle, seed=r.rollout_seed)
        self.generate_fn = _hook("rollout.custom_generate_function_path",
                                 r.custom_generate_function_path or generate.DEFAULT)
        self.keep_group: KeepGroup | None = None if r.over_sampling_batch_size is None else _hook(
            "rollout.dynamic_sampling_filter_path", r.dynamic_sampling_filter_path or filters.DEFAULT)
        self.take_buffered = _hook("rollout.buffer_filter_path", r.buffer_filter_path or filters.BUFFER_DEFAULT)
        self.buffer: list[Group] = []
        """Partial rollout's unfinished groups, oldest first."""

    # --- state (checkpointed) ---

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.cursor.state_dict(),
                "buffer": [[dataclasses.asdict(s) for s in group] for group in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor.load_state_dict(state["data"])
        self.buffer = [[Sample(**s) for s in group] for group in state.get("buffer", [])]

    # --- groups ---

    def new_groups(self, dataset: PromptDataset, indices: list[int], rollout_id: int, n: int, first_index: int = 0,
                   salt: int = 0) -> list[Group]:
        """n fresh samples of each prompt. Seeds depend on (run seed, rollout, sample index) only; samples
        are numbered on from `first_index` (the rollout's earlier rounds)."""
        groups = []
        for g, i in enumerate(indices):
            prompt = dataset[i]
            ids = self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            groups.append([
                Sample(prompt=prompt.text, label=prompt.label,
                       metadata=copy.deepcopy(prompt.metadata) if prompt.metadata else {},
                       index=prompt.index, tokens=list(ids),
                       seed=sample_seed(self.run_seed + salt, rollout_id, first_index + g * n + j))
                for j in range(n)])
        return groups

    async def complete(self, group: Group, params: SamplingParams, engine: EngineClient, rollout_id: int) -> Group:
        """Generate the group's unfinished samples, then reward those the generate function left without a
        reward, unless the generation was aborted (the group is not finished). A reward that is not finite
        is an error: one NaN would turn its group's advantages, then the weights, NaN."""
        todo = [i for i, s in enumerate(group) if s.status in ("pending", "aborted")]
        done = await asyncio.gather(*(self.generate_fn(self.r, group[i], params, engine) for i in todo))
        for i, sample in zip(todo, done):
            group[i] = sample
        if all(s.status != "aborted" for s in group):
            unrewarded = [s for s in group if s.reward is None]
            for sample, reward in zip(unrewarded, await compute_rewards(self.r, unrewarded)):
                sample.reward = reward
            for j, s in enumerate(group):
                assert s.reward is not None  # every unrewarded sample was just rewarded
                if not math.isfinite(s.reward):
                    source = (reward_source(self.r, s) if any(s is u for u in unrewarded)
                              else self.r.custom_generate_function_path or generate.DEFAULT)
                    raise RunError(f"rollout {rollout_id}, prompt {s.index}, sample {j} of its group: "
                                   f"{source} gave the reward {s.reward}, which is not finite")
        return group

    def evaluate(self, dataset: PromptDataset, rollout_id: int, n: int, params: SamplingParams,
                 engine: EngineClient, salt: int) -> list[Sample]:
        """n rewarded samples of every prompt of an evaluation dataset."""
        groups = self.new_groups(dataset, list(range(len(dataset))), rollout_id, n, salt=salt)
        return [s for group in asyncio.run(self._all(groups, params, engine, rollout_id)) for s in group]

    def rollout(self, rollout_id: int, params: SamplingParams, engine: EngineClient) -> tuple[list[Sample], int]:
        """The rollout's `rollout_batch_size` groups, flat and numbered, and how many groups the filter
        dropped."""
        r, n = self.r, self.r.n_samples_per_prompt
        keep, size = self.keep_group, r.over_sampling_batch_size
        if keep is None or size is None:  # set together: dynamic sampling is off
            fresh = self.new_groups(self.dataset, self.cursor.next_batch(r.rollout_batch_size), rollout_id, n)
            groups, dropped = asyncio.run(self._all(fresh, params, engine, rollout_id)), 0
        elif r.partial_rollout:
            groups, dropped = asyncio.run(self._as_they_finish(rollout_id, params, engine, keep, size))
        else:
            groups, dropped = asyncio.run(self._in_rounds(rollout_id, params, engine, keep, size))
        for g, group in enumerate(groups):
            for s in group:
                s.group_index = g
        return [s for group in groups for s in group], dropped

    async def _all(self, groups: list[Group], params: SamplingParams, engine: EngineClient,
                   rollout_id: int) -> list[Group]:
        return list(await asyncio.gather(*(self.complete(g, params, engine, rollout_id) for g in groups)))

    async def _in_rounds(self, rollout_id: int, params: SamplingParams, engine: EngineClient, keep: KeepGroup,
                         size: int) -> tuple[list[Group], int]:
        r, n = self.r, self.r.n_samples_per_prompt
        kept: list[Group] = []
        dropped = 0
        for round_ in range(MAX_SAMPLING_ROUNDS):
            indices = self.cursor.next_batch(size)
            fresh = self.new_groups(self.dataset, indices, rollout_id, n, first_index=round_ * len(indices) * n)
            for group in await self._all(fresh, params, engine, rollout_id):
                if len(kept) == r.rollout_batch_size:
                    break
                if keep(r, group):
                    kept.append(group)
                else:
                    dropped += 1
            if len(kept) == r.rollout_batch_size:
                return kept, dropped
        raise self._too_few(rollout_id, len(kept))

    async def _as_they_finish(self, rollout_id: int, params: SamplingParams, engine: EngineClient,
                              keep: KeepGroup, size: int) -> tuple[list[Group], int]:
        r, n = self.r, self.r.n_samples_per_prompt
        kept: list[Group] = []
        unused: list[Group] = []  # finished after enough had passed: back into the buffer, unjudged
        dropped = drawn = rounds = submitted = 0
        pending: dict[asyncio.Task[Group], int] = {}  # task -> submission order
        while len(kept) < r.rollout_batch_size:
            if len(kept) + len(pending) < r.rollout_batch_size:
                if rounds == MAX_SAMPLING_ROUNDS:
                    raise self._too_few(rollout_id, len(kept))
                rounds += 1
                groups = self.take_buffered(r, rollout_id, self.buffer, size)
                indices = self.cursor.next_batch(size - len(groups))
                groups += self.new_groups(self.dataset, indices, rollout_id, n, first_index=drawn)
                drawn += len(indices) * n
                for group in groups:
                    pending[asyncio.create_task(self.complete(group, params, engine, rollout_id))] = submitted
                    submitted += 1
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                del pending[task]
                group = task.result()
                if len(kept) == r.rollout_batch_size:
                    unused.append(group)
                elif keep(r, group):
                    kept.append(group)
                else:
                    dropped += 1
        engine.abort()
        unused += await asyncio.gather(*pending)
        await engine.reset()
        for group in unused:
            for s in group:
                if s.response_length:
                    s.metadata.setdefault("start_rollout_id", rollout_id)
        self.buffer += unused
        return kept, dropped

    def _too_few(self, rollout_id: int, kept: int) -> RunError:
        r = self.r
        return RunError(f"rollout {rollout_id}: only {kept} of {r.rollout_batch_size} groups passed "
                        f"{r.dynamic_sampling_filter_path or filters.DEFAULT} in {MAX_SAMPLING_ROUNDS} rounds of "
                        f"{r.over_sampling_batch_size} prompts")
