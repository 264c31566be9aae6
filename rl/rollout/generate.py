"""Generate functions (`rollout.custom_generate_function_path`): how one sample's response is produced.

A generate function is `async f(args, sample, sampling_params, engine) -> Sample`: slime's signature, with
the engine client (`rl.rollout.client.EngineClient`) in the place of slime's SGLang router address. It
extends `sample.tokens` with `Sample.append_generation` for what the policy wrote and
`Sample.append_observation` for what the environment wrote (no loss there), seeds each engine call with
`sample.next_seed()`, sets `sample.response`, and may set `sample.reward` (else the configured reward is
computed). `examples/tool_use/` is a multi-turn one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rl.rollout.client import EngineClient
from rl.rollout.engine import SamplingParams
from rl.sample import Sample

DEFAULT = "rl.rollout.generate:generate"


async def generate(args: Any, sample: Sample, sampling_params: SamplingParams, engine: EngineClient) -> Sample:
    """One turn: the response continues from the sample's tokens (its prompt, or where an aborted generation
    stopped) within what is left of `max_new_tokens`."""
    left = sampling_params.max_new_tokens - sample.response_length
    if left <= 0:
        sample.status = "truncated"
        return sample
    params = replace(sampling_params, max_new_tokens=left) if sample.response_length else sampling_params
    gen = await engine.generate(sample.tokens, params, sample.next_seed())
    sample.append_generation(gen)
    sample.response = engine.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    return sample
