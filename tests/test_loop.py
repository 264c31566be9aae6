"""The GRPO loop end to end on CPU, with Ray: resume exactness, checkpoints, bad inputs, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from conftest import CONFIGS, ROOT
from hpc.processes import processes
from rl import checkpoint, heartbeat
from rl.export import load_policy
from rl.interrupt import StopRequest
from rl.loop import RunError, run
from rl.rollout.filters import check_reward_nonzero_std
from rl.timings import SAVE_MARGIN, Timings
from rlhpc.config import load_config

REWARD_COLUMNS = ("rollout_id", "reward_mean", "reward_std", "response_len_mean")


def odd_first_char(args, sample):
    """A reward half the random policy's samples earn, so every rollout has a learning signal."""
    return float(bool(sample.response) and ord(sample.response[0]) % 2 == 1)


def tiny(tmp_path, tiny_model_dir, *overrides):
    return load_config(CONFIGS / "tiny_cpu.toml", [
        f"ckpt.hf_checkpoint='{tiny_model_dir}'", f"run.output_dir='{tmp_path}'", "rollout.num_rollout=6",
        "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "rollout.num_steps_per_rollout=2",
        "rollout.rollout_max_response_len=3", "rollout.custom_rm_path='test_loop:odd_first_char'",
        "ckpt.save_interval=2", "eval.eval_interval=3", "run.use_tensorboard=false", *overrides])


def final_weights(run_dir, model_dir):
    folder = checkpoint.latest(run_dir / "checkpoints")
    return folder, load_policy(folder, model_dir).state_dict()


def reward_columns(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in REWARD_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory, tiny_model_dir):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, run(tiny(run_dir, tiny_model_dir))


def assert_same_run(run_dir, straight_dir, model_dir):
    folder_a, weights_a = final_weights(straight_dir, model_dir)
    folder_b, weights_b = final_weights(run_dir, model_dir)
    assert folder_a.name == folder_b.name == "iter_0000006"
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert reward_columns(straight_dir) == reward_columns(run_dir)


def test_resumed_run_matches_the_uninterrupted_one_bitwise(straight, tmp_path, tiny_model_dir):
    straight_dir, result = straight
    rows = result["rows"]
    assert [r["rollout_id"] for r in rows] == list(range(6))
    assert {"reward_mean", "reward_std", "response_len_mean", "kl", "clipfrac", "entropy", "grad_norm", "lr",
            "time_rollout_s", "time_train_s", "time_sync_s", "samples_per_s"} <= set(rows[0])
    assert "eval/arith/pass@1" in rows[2] and "eval/arith/reward_mean" in rows[5]
    assert "eval_before_train/arith/reward_mean" in rows[0]
    assert checkpoint.complete_iterations(straight_dir / "checkpoints") == [2, 4, 6]
    assert heartbeat.read(straight_dir)["phase"] == "done"

    # The same run (its fresh rollouts are checked against this one by the stopped runs below), stopped "after
    # checkpoint 2": later checkpoints gone, the latest pointer back at 2, metrics rows of the lost rollouts
    # still in metrics.jsonl (as after a crash).
    broken_dir = tmp_path / "broken"
    shutil.copytree(straight_dir, broken_dir)
    for it in (4, 6):
        shutil.rmtree(checkpoint.iteration_dir(broken_dir / "checkpoints", it))
    (broken_dir / "checkpoints" / checkpoint.LATEST).write_text("2\n")
    record = tmp_path / "start.json"
    resumed = run(tiny(broken_dir, tiny_model_dir), start_record=record)
    assert [r["rollout_id"] for r in resumed["rows"]] == list(range(6))
    assert json.loads(record.read_text())["resumed_from"] == 2 and json.loads(record.read_text())["redone"] == 4
    assert_same_run(broken_dir, straight_dir, tiny_model_dir)
    # and training did move the weights
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    _, weights = final_weights(straight_dir, tiny_model_dir)
    assert any(not torch.equal(init[k], weights[k]) for k in weights)


class StopWhile(StopRequest):
    """A stop asked while the driver is in one of `phases` of rollout `at` (as a signal arriving then would),
    noticed at the driver's next look."""

    def __init__(self, run_dir, at, phases, time_left_s=None):
        super().__init__()
        self.run_dir, self.at, self.phases, self.time_left_s = run_dir, at, phases, time_left_s

    def is_set(self):
        beat = heartbeat.read(self.run_dir)
        if beat and beat["rollout_id"] == self.at and beat["phase"] in self.phases:
            self.set(self.time_left_s)
        return super().is_set()


@pytest.mark.parametrize(("at", "phases", "time_left_s", "stopped_at", "checkpoints", "redone"), [
    # generation abandoned, the state before rollout 3 saved
    (3, {"rollout"}, None, 3, [2, 3], 0),
    # during training: rollout 2 finishes, but no time is left to save, so checkpoint 2 stands
    (2, {"train", "sync", "eval"}, 0.0, 3, [2], 1),
], ids=["during-generation", "during-training-no-time-to-save"])
def test_a_stopped_run_resumes_exactly(straight, tmp_path, tiny_model_dir, at, phases, time_left_s, stopped_at,
                                       checkpoints, redone):
    result = run(tiny(tmp_path, tiny_model_dir), stop=StopWhile(tmp_path, at, phases, time_left_s))
    assert result["stopped_at"] == stopped_at
    assert checkpoint.complete_iterations(tmp_path / "checkpoints") == checkpoints
    assert heartbeat.read(tmp_path)["phase"] == "stopped"
    record = tmp_path / "start.json"
    resumed = run(tiny(tmp_path, tiny_model_dir), start_record=record)
    assert resumed["stopped_at"] is None and json.loads(record.read_text())["redone"] == redone
    assert_same_run(tmp_path, straight[0], tiny_model_dir)


class EndComing(StopRequest):
    """The job's end, as Slurm would give it, close once three rollouts are done: closer than another rollout and
    a save after it (both as the run measured them, in its timings.json), far enough for the save alone."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir

    def time_left(self):
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            return 1e6
        t = Timings.read(self.run_dir)
        return SAVE_MARGIN * t.save_s + t.step_s / 2


def test_the_run_stops_by_itself_before_the_jobs_end_and_resumes_exactly(straight, tmp_path, tiny_model_dir):
    """No signal: the loop sees that rollout 3 and a save would not fit before the end, saves and stops there;
    the next attempt redoes nothing and the run ends as the uninterrupted one. Checkpoints are written in the
    background: the stop's own is sealed before the run returns."""
    stop = EndComing(tmp_path)
    result = run(tiny(tmp_path, tiny_model_dir, "ckpt.async_save=true"), stop=stop)
    assert result["stopped_at"] == 3 and result["stop_reason"] == "deadline"
    assert checkpoint.complete_iterations(tmp_path / "checkpoints") == [2, 3]
    record = tmp_path / "start.json"
    run(tiny(tmp_path, tiny_model_dir), start_record=record)
    assert json.loads(record.read_text())["redone"] == 0
    assert_same_run(tmp_path, straight[0], tiny_model_dir)


@pytest.fixture(scope="module")
def two_rollouts(ray_local, tmp_path_factory, tiny_model_dir):
    """Two rollouts of the tiny run, on one worker: its config, folder and metrics rows."""
    cfg = tiny(tmp_path_factory.mktemp("one") / "run", tiny_model_dir, "rollout.num_rollout=2")
    return cfg, cfg.run_dir(), run(cfg)["rows"]


@pytest.fixture(scope="module")
def one_worker_weights(two_rollouts, tiny_model_dir):
    _, run_dir, rows = two_rollouts
    return rows, final_weights(run_dir, tiny_model_dir)[1]


@pytest.mark.parametrize(
    ("placement", "engines"),
    [(["perf.colocate=true"], 1), (["perf.actor_num_gpus_per_node=2", "rollout.balance_data=true"], 1),
     # colocated engines span every training GPU: one per worker
     (["perf.actor_num_gpus_per_node=2", "perf.torch_data_parallel='fsdp2'", "perf.colocate=true",
       "ckpt.async_save=true"], 2)],
    ids=["colocated-engine", "two-ddp-workers-balanced", "two-fsdp2-workers-colocated-async-save"],
)
def test_other_placements_train_the_same_policy(ray_local, tmp_path, tiny_model_dir, one_worker_weights, placement,
                                                engines, monkeypatch):
    from rl.rollout.pool import EnginePool

    spread_over, generate = [], EnginePool.generate

    def counted(pool, *args, **kwargs):
        spread_over.append(len(pool.engines))
        return generate(pool, *args, **kwargs)

    monkeypatch.setattr(EnginePool, "generate", counted)
    rows, expected = one_worker_weights
    got = run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=2", *placement))["rows"]
    assert set(spread_over) == {engines}  # each rollout's requests split over every engine
    assert [r["weight_version"] for r in got] == [r["weight_version"] for r in rows] == [0, 1]
    assert [r["reward_mean"] for r in got] == [r["reward_mean"] for r in rows]
    _, weights = final_weights(tmp_path, tiny_model_dir)
    for name, value in expected.items():
        assert torch.allclose(weights[name], value, atol=1e-4), name


def test_an_incomplete_checkpoint_is_never_loaded(straight, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(straight[0] / "checkpoints", ckpts)  # 2, 4 and 6
    # a save that died mid-way, and a sealed folder whose file was damaged afterwards
    (ckpts / ".iter_0000008.tmp").mkdir()
    damaged = checkpoint.iteration_dir(ckpts, 6) / "state.json"
    damaged.write_text(damaged.read_text().replace("6", "7"))
    assert checkpoint.latest(ckpts).name == "iter_0000004"


def test_export_gives_a_loadable_hugging_face_folder(two_rollouts, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from rlhpc.cli import app
    from rlhpc.config import dump_toml

    cfg, run_dir, _ = two_rollouts
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    result = CliRunner().invoke(app, ["export", str(run_dir), "--hf", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _, trained = final_weights(run_dir, tiny_model_dir)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
    result = CliRunner().invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt.hf_checkpoint='/nowhere/model'"], "ckpt.hf_checkpoint: /nowhere/model does not exist"),
        (["ckpt.hf_checkpoint='{data}'"], "is not a Hugging Face model folder"),
        (["rollout.prompt_data='{broken}'"], "broken.jsonl:2: not valid JSON"),
        (["ckpt.save='/proc/rlhpc-cannot-write'"], "cannot write to /proc/rlhpc-cannot-write"),
        (["rollout.over_sampling_batch_size=8", "rollout.dynamic_sampling_filter_path='nowhere_at_all:keep'"],
         "rollout.dynamic_sampling_filter_path: hook 'nowhere_at_all:keep': cannot import module"),
    ],
)
def test_bad_inputs_end_with_a_one_line_error(tmp_path, tiny_model_dir, overrides, message):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1=", "label": "2"}\n{"prompt": \n')
    overrides = [o.format(data=ROOT / "data", broken=broken) for o in overrides]
    cfg = tiny(tmp_path / "run", tiny_model_dir, *overrides)
    from rl.data import DataError

    with pytest.raises((RunError, DataError)) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / checkpoint.LATEST).exists()


def test_rlhpc_run_freezes_the_config_and_reports_rewards(ray_local, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from rlhpc.cli import app

    result = CliRunner().invoke(app, [
        "run", str(CONFIGS / "tiny_cpu.toml"), "--set", f"ckpt.hf_checkpoint='{tiny_model_dir}'",
        "--set", f"run.output_dir='{tmp_path}'", "--set", "rollout.num_rollout=2",
        "--set", "rollout.rollout_batch_size=4", "--set", "rollout.n_samples_per_prompt=2",
        "--set", "rollout.num_steps_per_rollout=1", "--set", "eval.eval_interval=2"])
    assert result.exit_code == 0, result.output
    assert "reward: first 5 rollouts" in result.output
    frozen = load_config(tmp_path / "config.toml")
    assert frozen.rollout.num_rollout == 2 and frozen.ckpt.hf_checkpoint == tiny_model_dir
    assert list((tmp_path / "tensorboard").iterdir())


def test_ppo_trains_a_critic_whose_value_loss_falls(ray_local, tmp_path, tiny_model_dir):
    """PPO with GAE: the critic learns to predict the reward (its loss falls) while the policy trains on its
    advantages; the critic is checkpointed with the policy."""
    rows = run(tiny(tmp_path, tiny_model_dir, "grpo.advantage_estimator='ppo'", "grpo.gamma=1.0", "grpo.lambd=0.95",
                    "optimizer.critic_lr=1e-2", "rollout.num_rollout=6", "ckpt.save_interval=3",
                    "eval.eval_interval=100"))["rows"]
    losses = [r["value_loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["value_loss"], r["critic_grad_norm"]])).all() for r in rows)
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses
    assert (checkpoint.latest(tmp_path / "checkpoints") / "critic" / "model").is_dir()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_enough_in_a_row(ray_local, tmp_path,
                                                                                      tiny_model_dir, monkeypatch):
    """Steps of 8 samples, two a rollout; NaN advantages poison rollout 1's first step, then every step of
    rollouts 2 and 3: the third skipped step in a row stops the run before rollout 3 writes anything, and the
    checkpoint that waited out the skipped steps of rollout 2 was never written."""
    from rl.loop import Driver

    poisoned = {1: range(8), 2: range(16), 3: range(16)}  # rollout -> the samples given a NaN advantage
    original = Driver.advantages
    rollouts = iter(range(4))

    def nan_advantages(self, train):
        old = original(self, train)
        for i in poisoned.get(next(rollouts), ()):
            train[i].advantages = [float("nan")] * train[i].response_length
        return old

    monkeypatch.setattr(Driver, "advantages", nan_advantages)
    with pytest.raises(RunError) as e:
        run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=4", "ckpt.save_interval=1", "eval.eval_interval=10",
                 "optimizer.max_consecutive_nonfinite_steps=3"))
    assert "3 optimizer steps in a row had a non-finite loss" in str(e.value)
    assert "optimizer.max_consecutive_nonfinite_steps" in str(e.value) and "iter_0000002" in str(e.value)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]
    assert checkpoint.complete_iterations(tmp_path / "checkpoints") == [1, 2]
    folder, weights = final_weights(tmp_path, tiny_model_dir)
    assert folder.name == "iter_0000002" and all(torch.isfinite(w).all() for w in weights.values())


GROUPS_JUDGED: list[tuple[list[float], bool]] = []


def recording_filter(args, samples):
    """The default filter, recording each group it judged."""
    keep = check_reward_nonzero_std(args, samples)
    GROUPS_JUDGED.append(([s.reward for s in samples], keep))
    return keep


def test_dynamic_sampling_trains_on_groups_with_signal_and_counts_those_dropped(ray_local, tmp_path, tiny_model_dir):
    GROUPS_JUDGED.clear()
    rows = run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=3", "rollout.over_sampling_batch_size=6",
                    "rollout.dynamic_sampling_filter_path='test_loop:recording_filter'"))["rows"]
    per_rollout, judged = [], []
    for group in GROUPS_JUDGED:  # each rollout judges groups until the 4th (rollout_batch_size) passes
        judged.append(group)
        if sum(keep for _, keep in judged) == 4:
            per_rollout, judged = [*per_rollout, judged], []
    assert len(per_rollout) == len(rows) == 3 and judged == []
    for row, groups in zip(rows, per_rollout):
        kept = [rewards for rewards, keep in groups if keep]
        assert all(max(rewards) > min(rewards) for rewards in kept)
        assert row["dynamic_sampling_dropped_groups"] == sum(not keep for _, keep in groups)
        assert row["reward_mean"] == pytest.approx(sum(map(sum, kept)) / 16)  # trained on exactly the kept ones
    assert sum(row["dynamic_sampling_dropped_groups"] for row in rows) > 0


def test_reinforce_pp_computes_log_probs_once_and_keep_last_prunes(ray_local, tmp_path, tiny_model_dir, monkeypatch):
    from rl.loop import Driver

    calls = []
    original = Driver.per_rank

    def counted(self, method, train, *args):
        calls.append((method, *args))
        return original(self, method, train, *args)

    monkeypatch.setattr(Driver, "per_rank", counted)
    rows = run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=3", "ckpt.save_interval=1", "ckpt.keep_last=2",
                    "grpo.advantage_estimator='reinforce_plus_plus_baseline'", "grpo.normalize_advantages=true",
                    "grpo.kl_coef=0.01",
                    "eval.eval_interval=10"))["rows"]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # per rollout: the policy's and the reference's log-probs for the advantages, reused as old log-probs
    assert calls == [("compute_log_probs",), ("compute_log_probs", True)] * 3
    assert checkpoint.complete_iterations(tmp_path / "checkpoints") == [2, 3]


@pytest.mark.parametrize("overrides", [(), ("grpo.use_rollout_logprobs=true",)],
                         ids=["recomputed", "rollout-log-probs"])
def test_the_driver_scores_nothing_itself_for_grpo(ray_local, tmp_path, tiny_model_dir, monkeypatch, overrides):
    """A rollout of two steps trains with no scoring pass from the driver: the workers score the later step's
    samples themselves (`tests/test_torch_backend.py`), or the engine's log-probs stand in for them."""
    from rl.loop import Driver

    calls = []
    original = Driver.per_rank

    def counted(self, method, train, *args):
        calls.append((method, len(train)))
        return original(self, method, train, *args)

    monkeypatch.setattr(Driver, "per_rank", counted)
    rows = run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=1", "perf.colocate=true", "eval.eval_interval=10",
                    *overrides))["rows"]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    assert calls == []


def engine_processes(state: str = "") -> list[int]:
    """Rollout engine actors' processes (Ray titles them `ray::TorchEngine.<method running>`)."""
    return [pid for pid, cmd in processes().items() if cmd.startswith(f"ray::TorchEngine{state}")]


def test_failed_engines_are_replaced_and_the_rollout_completes_unchanged(ray_local, tmp_path, tiny_model_dir):
    """Three engines; while rollout 1 generates, one dies (SIGKILL) and one stops answering (SIGSTOP)."""
    settings = ["rollout.num_rollout=2", "rollout.rollout_max_response_len=24", "sglang.rollout_num_gpus=3",
                "rollout.use_fault_tolerance=true", "rollout.rollout_health_check_interval=0.5",
                "rollout.rollout_health_check_timeout=2"]
    expected_rows = run(tiny(tmp_path / "straight", tiny_model_dir, *settings))["rows"]
    _, expected_weights = final_weights(tmp_path / "straight", tiny_model_dir)
    run_dir = tmp_path / "struck"
    hit: list[int] = []

    def strike():
        deadline = time.monotonic() + 120
        while len(hit) < 2 and time.monotonic() < deadline:
            beat = heartbeat.read(run_dir)
            if beat and beat["rollout_id"] == 1:
                # not one already struck: a killed process stays listed until it is reaped
                for pid in [p for p in engine_processes(".generate") if p not in hit][: 2 - len(hit)]:
                    os.kill(pid, signal.SIGKILL if not hit else signal.SIGSTOP)
                    hit.append(pid)
            time.sleep(0.005)

    striker = threading.Thread(target=strike)
    striker.start()
    rows = run(tiny(run_dir, tiny_model_dir, *settings))["rows"]
    striker.join()
    assert len(hit) == 2 and not set(hit) & set(engine_processes())  # both struck, both gone
    assert [r["engine_restarts"] for r in rows] == [0, 2]
    assert [{k: r[k] for k in REWARD_COLUMNS} for r in rows] == [{k: r[k] for k in REWARD_COLUMNS}
                                                                 for r in expected_rows]
    weights = final_weights(run_dir, tiny_model_dir)[1]
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def test_a_multi_turn_generate_function_trains_on_the_policy_turns_only(ray_local, tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    """examples/tool_use: two calculator calls, then the answer; the calculator's replies get loss mask 0."""
    from transformers import AutoTokenizer

    from rl.hooks import load_function
    from rl.loop import Driver

    example = ROOT / "examples" / "tool_use"
    calculate = load_function(f"{example / 'calculator.py'}:calculate")
    assert (calculate("12+30"), calculate("x(2*3)-1 y"), calculate("abc")) == ("12+30 = 42", "(2*3)-1 = 5",
                                                                                "no expression")
    trained = []
    original = Driver.train
    monkeypatch.setattr(Driver, "train", lambda self, train, old=None: (trained.extend(train),
                                                                         original(self, train, old))[1])
    cfg = load_config(example / "calculator.toml", [
        f"ckpt.hf_checkpoint='{tiny_model_dir}'", f"run.output_dir='{tmp_path}'", "rollout.num_rollout=1",
        "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=3", "run.use_tensorboard=false"])
    rows = run(cfg)["rows"]
    assert len(rows) == 1 and len(trained) == 6
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for s in trained:
        response = s.tokens[s.prompt_length:]
        runs: list[tuple[int, list[int]]] = []  # maximal runs of equal loss mask: (mask, tokens)
        for token, m in zip(response, s.loss_mask):
            if runs and runs[-1][0] == m:
                runs[-1][1].append(token)
            else:
                runs.append((m, [token]))
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]  # query, reply, query, reply, answer
        for m, tokens in runs:
            text = tokenizer.decode(tokens)
            if m:
                assert tokenizer.eos_token not in text[:-1]
            else:
                assert text.startswith("\n[calculator: ") and text.endswith("]\n") and text.count("]") == 1
        assert all(len(tokens) <= 6 for _, tokens in runs[:-1:2])


PARTIAL_JUDGED: list[list] = []


def recording_partial(args, samples):
    """The default filter, recording the samples of each group it judged."""
    PARTIAL_JUDGED.append([dataclasses.replace(s, metadata=dict(s.metadata)) for s in samples])
    return check_reward_nonzero_std(args, samples)


def test_partial_rollout_continues_cut_off_groups_in_the_next_rollout_and_checkpoints_them(ray_local, tmp_path,
                                                                                          tiny_model_dir):
    """Six groups of two sampled, two needed: once two have passed, the others are aborted mid-generation and
    continued by the next rollout, keeping the rollout they began in; the buffer survives a resume."""
    settings = ["rollout.over_sampling_batch_size=6", "rollout.rollout_batch_size=2",
                "rollout.n_samples_per_prompt=2", "rollout.num_steps_per_rollout=1", "rollout.partial_rollout=true",
                "rollout.rollout_max_response_len=24", "rollout.stream_interval=1",
                # a fifth of the vocabulary ends a sample: groups finish at different times
                f"rollout.rollout_stop_token_ids={list(range(20, 40))}", "ckpt.save_interval=1",
                "rollout.dynamic_sampling_filter_path='test_loop:recording_partial'", "eval.eval_interval=100"]
    PARTIAL_JUDGED.clear()
    rows = run(tiny(tmp_path, tiny_model_dir, *settings, "rollout.num_rollout=2"))["rows"]
    assert all(r["partial_rollout_buffered_groups"] > 0 for r in rows)
    continued = [s for group in PARTIAL_JUDGED for s in group if len(s.weight_versions) > 1]
    assert continued, "no cut-off sample was continued"
    for s in continued:  # begun under the policy of rollout 0, finished under that of rollout 1
        assert s.metadata["start_rollout_id"] == 0 and s.weight_versions[0] == 0 and s.weight_versions[-1] == 1
        assert len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length <= 24
    saved = json.loads((checkpoint.latest(tmp_path / "checkpoints") / "state.json").read_text())["buffer"]
    assert saved and all(s["status"] in ("aborted", "completed", "truncated") for g in saved for s in g)

    PARTIAL_JUDGED.clear()
    run(tiny(tmp_path, tiny_model_dir, *settings, "rollout.num_rollout=3"))
    after = json.loads((checkpoint.latest(tmp_path / "checkpoints") / "state.json").read_text())["buffer"]
    seen = {s.seed: s for group in PARTIAL_JUDGED for s in group} | {s["seed"]: s for g in after for s in g}
    for s in (s for group in saved for s in group):  # none lost: judged in rollout 2 or still buffered, grown
        now = seen[s["seed"]]
        tokens = now.tokens if hasattr(now, "tokens") else now["tokens"]
        assert tokens[: len(s["tokens"])] == s["tokens"]


def test_async_training_generates_ahead_within_the_staleness_bound_and_resumes_exactly(ray_local, tmp_path,
                                                                                       tiny_model_dir):
    """Rollout r+1 generates while r trains: its samples come from the policy one version behind; a run stopped
    after a checkpoint (which holds the rollout generated ahead) ends bitwise as the uninterrupted one."""
    settings = ["rollout.async_train=true", "rollout.async_buffer_size=1", "rollout.update_weights_interval=1",
                "eval.eval_interval=100"]
    rows = run(tiny(tmp_path / "straight", tiny_model_dir, *settings, "rollout.num_rollout=4"))["rows"]
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]
    state = json.loads((checkpoint.iteration_dir(tmp_path / "straight" / "checkpoints", 2) / "state.json").read_text())
    assert [g["rollout_id"] for g in state["pending"]] == [2]

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # then lose everything after checkpoint 2
    shutil.rmtree(checkpoint.iteration_dir(tmp_path / "resumed" / "checkpoints", 4))
    (tmp_path / "resumed" / "checkpoints" / checkpoint.LATEST).write_text("2\n")
    run(tiny(tmp_path / "resumed", tiny_model_dir, *settings, "rollout.num_rollout=4"))
    assert reward_columns(tmp_path / "resumed") == reward_columns(tmp_path / "straight")
    expected = final_weights(tmp_path / "straight", tiny_model_dir)[1]
    weights = final_weights(tmp_path / "resumed", tiny_model_dir)[1]
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    wider = run(tiny(tmp_path / "wider", tiny_model_dir, "rollout.async_train=true", "rollout.async_buffer_size=2",
                     "rollout.update_weights_interval=2", "rollout.num_rollout=3", "eval.eval_interval=100"))["rows"]
    assert all(r["staleness"] <= 2 + 2 - 1 for r in wider)
    assert [r["time_sync_s"] > 0 for r in wider] == [False, True, False]  # weights every second rollout


@pytest.mark.parametrize("std_normalize", [True, False], ids=["grpo", "dr-grpo-no-std"])
def test_the_loop_trains_on_group_normalized_advantages_of_its_own_samples(ray_local, tmp_path, tiny_model_dir,
                                                                          monkeypatch, std_normalize):
    """What the driver hands to the workers, recorded at `Driver.train`: each sample's advantage on its loss
    tokens is `group_normalize` of the rewards of its own prompt group, the group taken from the `group_index`
    the rollout gave its samples (not from the loop's grouping), each group `n_samples_per_prompt` strong."""
    from rl.advantages import group_normalize
    from rl.loop import Driver

    n = 4
    generated, trained = [], []  # per rollout: the rollout's samples; what went to training
    original_learn, original_train = Driver.learn, Driver.train

    def learn(self, batch, pending_eval):
        generated.append([(s.group_index, s.index, list(s.tokens), s.reward) for s in batch.samples])
        return original_learn(self, batch, pending_eval)

    def train(self, train, old=None):  # copied before the workers see them
        trained.append([(list(s.tokens), s.response_length, list(s.loss_mask), s.reward, list(s.advantages))
                        for s in train])
        return original_train(self, train, old)

    monkeypatch.setattr(Driver, "learn", learn)
    monkeypatch.setattr(Driver, "train", train)
    rows = run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=2", f"rollout.n_samples_per_prompt={n}",
                    "rollout.num_steps_per_rollout=1", "eval.eval_interval=100", "ckpt.save_interval=100",
                    f"grpo.disable_grpo_std_normalization={str(not std_normalize).lower()}"))["rows"]
    assert len(rows) == len(generated) == len(trained) == 2
    compared = nonzero = 0
    for samples, train in zip(generated, trained):
        assert len(train) == len(samples) == 4 * n  # rollout_batch_size groups
        groups: dict[int, list[int]] = {}
        for i, ((group, _, tokens, reward), t) in enumerate(zip(samples, train)):
            assert (t[0], t[3]) == (tokens, reward)  # the trained sample is the generated one
            groups.setdefault(group, []).append(i)
        assert len(groups) == 4 and all(len(members) == n for members in groups.values())
        for members in groups.values():
            # one prompt per group: same dataset index, same prompt tokens
            assert len({samples[i][1] for i in members}) == 1
            assert len({tuple(train[i][0][: len(train[i][0]) - train[i][1]]) for i in members}) == 1
            expected = group_normalize(torch.tensor([train[i][3] for i in members], dtype=torch.float32), n,
                                       std_normalize=std_normalize)
            for i, want in zip(members, expected.tolist()):
                _, length, mask, _, advantages = train[i]
                assert len(advantages) == len(mask) == length and sum(mask) > 0
                got = [a for a, m in zip(advantages, mask) if m]
                assert got == pytest.approx([want] * len(got), rel=1e-6, abs=1e-6), (i, got, want)
                compared += len(got)
                nonzero += want != 0
    assert compared > 0 and nonzero > 0  # some group had unequal rewards: a wrong sign or scale cannot pass
