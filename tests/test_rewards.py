from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rl.config import RolloutConfig
from rl.rewards import compute_rewards, score
from rl.rewards.math import last_boxed
from rl.rewards.remote import RemoteRewardError
from rl.rollout.engine import Generation
from rl.sample import Sample

THINK = "<think>Let me add the fractions carefully.</think>"


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("We get \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("So the answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
        ("Total: \\boxed{1,000}", "1000", 1.0),
        ("\\boxed{10 \\text{ cm}}", "10", 1.0),
        ("\\boxed{72^\\circ}", "72", 1.0),
        ("\\boxed{5.}", "5", 1.0),
        ("\\boxed{x = 3}", "3", 1.0),
        ("first \\boxed{3} then, on reflection, \\boxed{4}", "4", 1.0),  # the last box counts
        ("first \\boxed{4} then, on reflection, \\boxed{3}", "4", 0.0),
        ("The answer is 7.", "7", 0.0),  # no boxed answer
        ("so the answer is \\boxed{\\frac{1}{", "0.5", 0.0),  # truncated mid-box
        ("\\boxed{7}", "\\boxed{7}", 1.0),  # boxed label
        ("\\boxed{8}", "7", 0.0),
    ],
)
def test_math(response, label, expected):
    assert score("math", response, label) == expected


def test_deepscaler_reads_only_after_the_reasoning():
    assert score("deepscaler", THINK + " so \\boxed{\\frac{3}{4}}", "0.75") == 1.0
    assert score("deepscaler", "no reasoning block \\boxed{0.75}", "0.75") == 0.0
    assert score("deepscaler", "<think>maybe \\boxed{0.75}</think> I answer \\boxed{1}", "0.75") == 0.0
    assert score("deepscaler", "<think>still thinking... \\boxed{0.75}", "0.75") == 0.0  # truncated
    assert score("deepscaler", THINK + " no box", "0.75") == 0.0
    assert score("boxed_deepscaler", THINK + "\\boxed{2}", "2") == 1.0


def test_dapo_is_plus_or_minus_one():
    assert score("dapo", "Long derivation...\nAnswer: 34", "34") == 1.0
    assert score("dapo", "Answer: 12\n...wait.\nAnswer: 1,000", "1000") == 1.0
    assert score("dapo", "Answer: $\\frac{1}{2}$.", "0.5") == 1.0
    assert score("dapo", "Answer: 33", "34") == -1.0
    assert score("dapo", "The result is 34.", "34") == -1.0  # no Answer: line
    assert score("dapo", "Answer: 34" + " filler" * 60, "34") == -1.0  # not in the final 300 characters


def test_f1_is_squad_token_f1():
    assert score("f1", "The Eiffel Tower.", "eiffel tower") == 1.0
    assert score("f1", "Paris France", "Paris") == pytest.approx(2 / 3)
    assert score("f1", "London", "Paris") == 0.0
    assert score("f1", "yes it is", "yes") == 0.0  # yes/no must match exactly
    assert score("f1", "7", "7") == 1.0 and score("f1", "17", "7") == 0.0


def test_gpqa_letter_choice():
    choices = {"choices": ["3 m/s", "5 m/s", "7 m/s", "9 m/s"]}
    assert score("gpqa", THINK + "The answer is (B).", "B") == 1.0
    assert score("gpqa", "Final answer: C", "B") == 0.0
    assert score("gpqa", "I pick B", 1) == 1.0  # label as index
    assert score("gpqa", "It must be B.", "5 m/s", choices) == 1.0  # label as the choice text
    assert score("gpqa", "The speed is 5 m/s", "5 m/s", choices) == 1.0  # no letter, right text
    assert score("gpqa", "Answer: D", "A", {"correct_letter": "D"}) == 1.0
    assert score("boxed_gpqa", "reasoning about A... \\boxed{C}", "C") == 1.0


def test_boxed_prefix_scores_only_the_box():
    assert score("boxed_f1", "The answer is \\boxed{Paris}, I think", "Paris") == 1.0
    assert score("f1", "The answer is \\boxed{Paris}, I think", "Paris") < 1.0
    assert score("boxed_f1", "no box Paris", "Paris") == 0.0
    assert score("boxed_math", "\\boxed{0.5}", "1/2") == 1.0


def test_last_boxed_matches_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{\\frac{1}{2}}}") == "\\sqrt{\\frac{1}{2}}"
    assert last_boxed("\\fbox{3}") == "3" and last_boxed("\\boxed{unclosed") is None and last_boxed("x") is None


def test_unknown_type():
    with pytest.raises(ValueError, match="unknown rm_type"):
        score("sentiment", "x", "y")


def rollout_config(tmp_path, **kw):
    (tmp_path / "d.jsonl").write_text('{"input": "q"}\n')
    return RolloutConfig(prompt_data=tmp_path / "d.jsonl", rollout_batch_size=1, **kw)


def samples():
    return [Sample(prompt="2+2=", response="\\boxed{4}", label="4"), Sample(prompt="2+3=", response="6", label="5")]


def test_compute_rewards_uses_the_rule_and_per_sample_rm_type(tmp_path):
    cfg = rollout_config(tmp_path, rm_type="math")
    batch = samples() + [Sample(prompt="p", response="Paris", label="Paris", metadata={"rm_type": "f1"})]
    assert asyncio.run(compute_rewards(cfg, batch)) == [1.0, 0.0, 1.0]


def length_reward(args, sample):
    return len(sample.response)


async def async_length_reward(args, sample):
    return len(sample.response) * 10


def group_reward(args, batch):
    return [i for i, _ in enumerate(batch)]


@pytest.mark.parametrize(
    ("path", "group", "expected"),
    [
        ("test_rewards:length_reward", False, [9.0, 1.0]),
        ("test_rewards:async_length_reward", False, [90.0, 10.0]),
        ("test_rewards.group_reward", True, [0.0, 1.0]),
    ],
)
def test_custom_reward_functions(tmp_path, path, group, expected):
    cfg = rollout_config(tmp_path, custom_rm_path=path, group_rm=group)
    assert asyncio.run(compute_rewards(cfg, samples())) == expected


def test_custom_reward_path_that_does_not_import(tmp_path):
    cfg = rollout_config(tmp_path, custom_rm_path="no_such_module:f")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        asyncio.run(compute_rewards(cfg, samples()))


class RewardServer:
    """A reward model on loopback that fails its first `failures` requests."""

    def __init__(self, failures=0):
        self.failures, self.seen = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append(body)
                if len(outer.seen) <= outer.failures:
                    self.send_response(503)
                    self.end_headers()
                    return
                data = json.dumps({"reward": float(body["response"] == body["label"])}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/reward"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_reward_retries_then_succeeds(tmp_path, monkeypatch):
    from rl.rewards import remote

    monkeypatch.setitem(remote.remote_reward.__kwdefaults__, "backoff_s", 0.01)
    server = RewardServer(failures=2)
    try:
        cfg = rollout_config(tmp_path, rm_type="remote_rm", rm_url=server.url, rm_max_retries=3)
        batch = [Sample(prompt="2+2=", response="4", label="4")]
        assert asyncio.run(compute_rewards(cfg, batch)) == [1.0]
        assert len(server.seen) == 3 and server.seen[-1] == {"prompt": "2+2=", "response": "4", "label": "4"}
    finally:
        server.close()


def test_remote_reward_that_stays_down_is_a_clear_error():
    from rl.rewards.remote import remote_reward

    server = RewardServer(failures=100)
    try:
        with pytest.raises(RemoteRewardError, match=r"still failing after 3 attempts"):
            asyncio.run(remote_reward(server.url, {"prompt": "", "response": "", "label": ""},
                                      max_retries=2, backoff_s=0.01))
        assert len(server.seen) == 3
    finally:
        server.close()


def scored_reward(args, sample):
    return {"accuracy": float(sample.response == "\\boxed{4}"), "format": 0.5}


def test_reward_key_picks_the_entry_of_a_dict_reward(tmp_path):
    """slime's --reward-key: a reward model answering several scores trains on the one named."""
    cfg = rollout_config(tmp_path, custom_rm_path="test_rewards:scored_reward", reward_key="accuracy")
    assert asyncio.run(compute_rewards(cfg, samples())) == [1.0, 0.0]
    cfg = rollout_config(tmp_path, custom_rm_path="test_rewards:scored_reward", reward_key="fluency")
    with pytest.raises(ValueError, match="has no 'fluency' \\(rollout.reward_key\\)"):
        asyncio.run(compute_rewards(cfg, samples()))
    cfg = rollout_config(tmp_path, custom_rm_path="test_rewards:scored_reward")
    with pytest.raises(ValueError, match="answered a dict \\(accuracy, format\\): name the entry"):
        asyncio.run(compute_rewards(cfg, samples()))
    server = RewardServer()
    try:  # the server answers {"reward": ...}: reward_key names that entry too
        cfg = rollout_config(tmp_path, rm_type="remote_rm", rm_url=server.url, reward_key="reward")
        assert asyncio.run(compute_rewards(cfg, [Sample(prompt="2+2=", response="4", label="4")])) == [1.0]
        cfg = rollout_config(tmp_path, rm_type="remote_rm", rm_url=server.url, reward_key="score")
        with pytest.raises(RemoteRewardError, match="has no 'score'"):
            asyncio.run(compute_rewards(cfg, [Sample(prompt="2+2=", response="4", label="4")]))
    finally:
        server.close()


class _Tokenizer:
    """Characters as token ids: enough for the sampler and the default generate function."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


class _Pool:
    """An engine that answers "7" to everything."""

    def generate(self, prompts, params, seeds, abandon, deliver) -> None:
        deliver([(i, Generation([ord("7")], [-1.0], "stop")) for i in range(len(prompts))])


def second_is_nan(args, batch):
    return [1.0, float("nan")]


async def generate_with_inf_reward(args, sample, params, engine):
    sample.response, sample.status, sample.reward = "7", "completed", float("-inf")
    return sample


async def remote_nan(url, payload, **kwargs):
    return float("nan")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.custom_rm_path='test_rewards:second_is_nan'", "rollout.group_rm=true"],
         "rollout 7, prompt 0, sample 1 of its group: test_rewards:second_is_nan gave the reward nan"),
        (["rollout.custom_generate_function_path='test_rewards:generate_with_inf_reward'"],
         "rollout 7, prompt 0, sample 0 of its group: test_rewards:generate_with_inf_reward gave the reward -inf"),
        (["rollout.rm_type='remote_rm'", "rollout.rm_url='http://127.0.0.1:9/rm'"],
         "rollout 7, prompt 0, sample 0 of its group: remote_rm at http://127.0.0.1:9/rm gave the reward nan"),
    ],
    ids=["custom", "generate-function", "remote"],
)
def test_a_non_finite_reward_is_refused_naming_the_sample_and_the_reward_function(monkeypatch, overrides, message):
    """One NaN reward would turn its group's advantages, and then the weights, NaN: the rollout stops there."""
    from conftest import CONFIGS

    from rl.data import PromptDataset
    from rl.errors import RunError
    from rl.rollout.client import EngineClient
    from rl.rollout.engine import SamplingParams
    from rl.rollout.sampling import Sampler
    from rlhpc.config import load_config

    monkeypatch.setattr("rl.rewards.remote.remote_reward", remote_nan)
    cfg = load_config(CONFIGS / "tiny_cpu.toml", ["ckpt.hf_checkpoint='/nowhere'", "rollout.rollout_shuffle=false",
                                                  "rollout.rollout_batch_size=1", "rollout.n_samples_per_prompt=2",
                                                  "rollout.num_steps_per_rollout=1",
                                                  *overrides])
    r = cfg.rollout
    sampler = Sampler(cfg, _Tokenizer(), PromptDataset(r.prompt_data, input_key=r.input_key, label_key=r.label_key))
    with pytest.raises(RunError) as e:
        sampler.rollout(7, SamplingParams(max_new_tokens=1), EngineClient(_Pool(), _Tokenizer()))
    assert str(e.value).startswith(message) and "not finite" in str(e.value)
