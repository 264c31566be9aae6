"""What the default generate function and the engine client make of a generation: slime's `rollout_stop`
(stop strings) and `rollout_skip_special_tokens`, for any engine."""

from __future__ import annotations

import asyncio

from rl.config import RolloutConfig
from rl.rollout.client import EngineClient
from rl.rollout.engine import Generation, SamplingParams
from rl.rollout.generate import generate
from rl.sample import Sample

VOCAB = ["<eos>", "<tool>", "4", "2", " </ans", "wer>", " more"]
EOS, TOOL, FOUR, TWO, ANS, WER, MORE = range(len(VOCAB))


class Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and VOCAB[i].startswith("<")))


class Pool:
    """An engine that never stops at strings: it answers `output` whatever it is asked."""

    def __init__(self, output: list[int], finish_reason: str = "length"):
        self.gen = Generation(output, [-(k + 1.0) for k in range(len(output))], finish_reason)

    def generate(self, prompts, params, seeds, abandon, deliver) -> None:
        deliver([(i, self.gen) for i in range(len(prompts))])


def run(tmp_path, output: list[int], finish_reason: str = "length", **rollout) -> Sample:
    (tmp_path / "d.jsonl").write_text('{"input": "q"}\n')
    args = RolloutConfig(prompt_data=tmp_path / "d.jsonl", rollout_batch_size=1, **rollout)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(EOS,), stop=tuple(args.rollout_stop))
    sample = Sample(prompt="2+2=", tokens=[TWO, TWO])

    async def one() -> Sample:
        return await generate(args, sample, params, EngineClient(Pool(output, finish_reason), Tokenizer()))

    return asyncio.run(one())


def test_a_stop_string_ends_the_response_after_the_token_that_completes_it(tmp_path):
    s = run(tmp_path, [FOUR, TOOL, ANS, WER, MORE, MORE], rollout_stop=["</answer>"])
    assert s.response_ids == [FOUR, TOOL, ANS, WER] and s.rollout_log_probs == [-1.0, -2.0, -3.0, -4.0]
    assert s.status == "completed" and s.response == "4<tool> "  # the stop string is not in the text
    s = run(tmp_path, [FOUR, MORE], rollout_stop=["</answer>"])
    assert s.response_ids == [FOUR, MORE] and s.status == "truncated"


def test_special_tokens_stay_in_the_text_unless_skipped(tmp_path):
    """slime's default keeps them; the stop token that ended the response is never in the text (SGLang's)."""
    assert run(tmp_path, [FOUR, TOOL, TWO, EOS], "stop").response == "4<tool>2"
    assert run(tmp_path, [FOUR, TOOL, TWO, EOS], "stop", rollout_skip_special_tokens=True).response == "42"
