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
    sample.response = response_text(engine.tokenizer, sample.response_ids, sampling_params,
                                    skip_special_tokens=args.rollout_skip_special_tokens)
    return sample


def response_text(tokenizer: Any, ids: list[int], params: SamplingParams, *, skip_special_tokens: bool) -> str:
    """The text of a response as SGLang returns it: without the stop token or stop string that ended it (both
    stay in the tokens), special tokens kept unless `skip_special_tokens` (slime's
    `--rollout-skip-special-tokens`)."""
    if ids and ids[-1] in params.stop_token_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    ends = [i for s in params.stop if (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text
