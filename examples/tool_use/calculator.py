"""A multi-turn rollout with a tool: the policy may consult a calculator before it answers.

Each episode is: the prompt ("12+30="); the policy writes a query for the calculator (one turn, up to
`TURN_TOKENS` tokens or its end-of-turn token); the calculator's reply, written by the environment; again,
up to `MAX_CALLS` calls; then the policy's answer. The calculator's replies are observations: the policy
reads them but is not trained on them (`Sample.append_observation` gives them loss mask 0), which is what
keeps a model from learning to write tool output itself.

    custom_generate_function_path = "calculator.py:generate"   # in [rollout], relative to the config
    custom_rm_path = "calculator.py:reward"

The episode's turn count is kept in the sample's metadata, so an episode cut off by partial rollout goes
on where it stopped.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import replace
from typing import Any

from rl.rollout.client import EngineClient
from rl.rollout.engine import SamplingParams
from rl.sample import Sample

TURN_TOKENS = 6
MAX_CALLS = 2
EXPRESSION = re.compile(r"[0-9(][0-9+\-* ()]*")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(query: str) -> str:
    """The tool: the first arithmetic expression in `query` (integers, + - * and parentheses), evaluated."""
    found = EXPRESSION.search(query)
    if not found:
        return "no expression"
    try:
        return f"{found.group().strip()} = {_evaluate(ast.parse(found.group().strip(), mode='eval').body)}"
    except (SyntaxError, ValueError):
        return "cannot evaluate"


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if max(abs(left), abs(right)) > 10**6:
            raise ValueError("too large")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


async def generate(args: Any, sample: Sample, sampling_params: SamplingParams, engine: EngineClient) -> Sample:
    turn = sample.metadata.setdefault("calculator_turn", 0)
    while sample.response_length < sampling_params.max_new_tokens:
        left = sampling_params.max_new_tokens - sample.response_length
        answering = turn == MAX_CALLS
        params = replace(sampling_params, max_new_tokens=left if answering else min(TURN_TOKENS, left))
        gen = await engine.generate(sample.tokens, params, sample.next_seed())
        sample.append_generation(gen)
        if gen.finish_reason == "abort" or answering:
            break
        query = engine.tokenizer.decode(gen.output_ids, skip_special_tokens=True)
        sample.append_observation(engine.tokenizer(f"\n[calculator: {calculate(query)}]\n",
                                                   add_special_tokens=False)["input_ids"])
        turn = sample.metadata["calculator_turn"] = turn + 1
    if sample.status != "aborted" and sample.response_length >= sampling_params.max_new_tokens and turn < MAX_CALLS:
        sample.status = "truncated"
    sample.response = engine.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    return sample


def reward(args: Any, sample: Sample) -> float:
    """1 when the answer (the text after the last calculator reply) starts with the label."""
    answer = sample.response.rsplit("]\n", 1)[-1].strip()
    return float(answer.startswith(str(sample.label)))
